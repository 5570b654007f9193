"""Connection aggregate, credentials value object, trust set and settings of the vault."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from services.vault.domain import (
    Account,
    AuditEntry,
    Connection,
    Credentials,
    IssuedLogin,
    RefreshedTokens,
    refresh_backoff_s,
)
from services.vault.errors import InvalidKeyring, InvalidRequest, ReconnectRequired, UnauthorizedRequester
from services.vault.settings import VaultSettings
from services.vault.trust import TrustedRequesters
from shared.sealing import KeyPair

NOW = datetime(2026, 11, 1, tzinfo=UTC)
LATER = datetime(2026, 11, 2, tzinfo=UTC)
ACCESS = "sk-ant-oat01-ACCESS-secret-value"
REFRESH = "sk-ant-ort01-REFRESH-secret-value"


def _login(**overrides: Any) -> IssuedLogin:
    values: dict[str, Any] = {
        "kind": "oauth",
        "credentials": Credentials(ACCESS, REFRESH),
        "scopes": ("user:inference",),
        "expires_at": 1000,
        "refresh_token_expires_at": 5000,
        "account": Account(email="a@example.com"),
    }
    return IssuedLogin(**(values | overrides))


def _connection(**overrides: Any) -> Connection:
    return Connection.connect("user-1", _login(**overrides), now=NOW)


def test_credentials_never_show_tokens() -> None:
    creds = Credentials(ACCESS, REFRESH)
    shown = repr(creds) + str(creds) + f"{creds}" + repr(_connection()) + repr([creds])
    assert ACCESS not in shown and REFRESH not in shown
    assert "refresh_token=<hidden>" in repr(creds)
    assert "refresh_token=None" in repr(Credentials(ACCESS))


def test_credentials_bytes_round_trip() -> None:
    creds = Credentials(ACCESS, REFRESH)
    assert Credentials.from_bytes(creds.to_bytes()) == creds
    assert Credentials.from_bytes(Credentials(ACCESS).to_bytes()).refresh_token is None


def test_first_connection_is_version_one_and_connected() -> None:
    conn = _connection()
    assert (conn.version, conn.state, conn.scopes) == (1, "connected", ("user:inference",))
    assert conn.created_at == conn.updated_at == NOW
    assert conn.can_refresh


def test_reconnect_replaces_tokens_bumps_version_and_clears_failure_state() -> None:
    conn = _connection()
    conn.state = "reconnect_required"
    conn.reconnect(_login(credentials=Credentials("new-access", "new-refresh"), scopes=("user:inference", "user:profile"),
                          expires_at=2000, refresh_token_expires_at=None, account=None), now=LATER)
    assert conn.version == 2
    assert conn.state == "connected"
    assert conn.credentials == Credentials("new-access", "new-refresh")
    assert conn.expires_at == 2000 and conn.updated_at == LATER and conn.created_at == NOW
    assert conn.account == Account(email="a@example.com")  # kept when the new event has none


@pytest.mark.parametrize(("mode", "refresh"), [("file", REFRESH), ("access_only", None), ("env", None)])
def test_grant_only_file_mode_releases_the_refresh_token(mode: str, refresh: str | None) -> None:
    grant = _connection().release(mode)
    assert grant.credentials.access_token == ACCESS
    assert grant.credentials.refresh_token == refresh
    assert (grant.expires_at, grant.scopes) == (1000, ("user:inference",))


def test_refresh_failed_still_grants_but_reconnect_required_does_not() -> None:
    conn = _connection()
    conn.state = "refresh_failed"
    assert conn.release("file").credentials.access_token == ACCESS
    conn.state = "reconnect_required"
    with pytest.raises(ReconnectRequired) as info:
        conn.release("access_only")
    assert info.value.reason == "reconnect_required"


def test_setup_token_connection_cannot_refresh() -> None:
    conn = _connection(kind="setup_token", credentials=Credentials("sk-ant-oat01-year"))
    assert not conn.can_refresh
    assert conn.release("file").credentials.refresh_token is None


# --- trust -------------------------------------------------------------------------
def test_trusted_requesters_from_env_and_sandbox_key_files(tmp_path) -> None:
    from_env, from_file, other_file, stranger = (KeyPair.generate() for _ in range(4))
    (tmp_path / "sandbox.hpke.pub").write_text(from_file.recipient.public_b64 + "\n")
    (tmp_path / "sandbox-2.hpke.pub").write_text("garbage")  # skipped, not fatal
    (tmp_path / "auth.hpke.pub").write_text(other_file.recipient.public_b64)  # not a sandbox key

    trusted = TrustedRequesters.load(f" {from_env.recipient.public_b64} ,", tmp_path)

    assert len(trusted) == 2
    for pair in (from_env, from_file):
        assert trusted.recipient(pair.recipient.public_b64, pair.key_id).key_id == pair.key_id
    for pair in (other_file, stranger):
        with pytest.raises(UnauthorizedRequester):
            trusted.recipient(pair.recipient.public_b64, pair.key_id)


def test_trusted_requester_key_id_must_match_and_key_must_parse(tmp_path) -> None:
    pair = KeyPair.generate()
    trusted = TrustedRequesters.of([pair.recipient])
    with pytest.raises(InvalidRequest):
        trusted.recipient(pair.recipient.public_b64, "0" * 32)
    with pytest.raises(InvalidRequest):
        trusted.recipient("not-a-key", pair.key_id)


def test_bad_trusted_key_in_env_is_a_configuration_error(tmp_path) -> None:
    with pytest.raises(InvalidKeyring):
        TrustedRequesters.load("bogus", tmp_path)


# --- settings ----------------------------------------------------------------------
def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("DATABASE_URL", "VAULT_HPKE_PRIVATE_KEY", "VAULT_KEKS", "VAULT_TRUSTED_REQUESTER_KEYS",
                 "VAULT_DATABASE_SCHEMA", "CCBRIDGE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    defaults = VaultSettings()
    assert defaults.database_url.get_secret_value() == "sqlite+aiosqlite:///./var/vault.db"
    assert defaults.hpke_private_key is None and defaults.keks is None and defaults.trusted_requester_keys == ""

    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u:pw@127.0.0.1/db")
    monkeypatch.setenv("VAULT_HPKE_PRIVATE_KEY", "   ")
    monkeypatch.setenv("VAULT_KEKS", '{"active":"a","keys":{}}')
    monkeypatch.setenv("CCBRIDGE_DATA_DIR", str(tmp_path))
    configured = VaultSettings()
    assert configured.database_url.get_secret_value().startswith("postgresql+asyncpg://")
    assert "pw" not in repr(configured)
    assert configured.hpke_private_key is None  # blank means "use the key file"
    assert configured.keks is not None and configured.keys_dir == tmp_path / "keys"


# --- refresh rules ---------------------------------------------------------------------
def _tokens(**overrides: object) -> RefreshedTokens:
    values: dict = {"access_token": "new-access", "refresh_token": "new-refresh", "expires_at": 9000}
    values.update(overrides)
    return RefreshedTokens(**values)


def test_refresh_due_respects_margin_backoff_and_state() -> None:
    conn = _connection(expires_at=10_000)
    assert not conn.refresh_due(now_ms=1_000, margin_ms=5_000)
    assert conn.refresh_due(now_ms=5_000, margin_ms=5_000)
    conn.next_refresh_at = 7_000
    assert not conn.refresh_due(now_ms=6_000, margin_ms=5_000)
    assert conn.refresh_due(now_ms=7_000, margin_ms=5_000)
    conn.state = "reconnect_required"
    assert not conn.refresh_due(now_ms=7_000, margin_ms=5_000)
    assert not _connection(kind="setup_token", credentials=Credentials("sk-ant-oat01-year")).refreshable


def test_successful_refresh_rotates_or_keeps_the_refresh_token_and_heals_the_state() -> None:
    conn = _connection()
    conn.refresh_failed("rate_limited", retry_at_ms=5, now=NOW)
    assert (conn.state, conn.refresh_failures, conn.version) == ("refresh_failed", 1, 2)

    conn.refreshed(_tokens(scopes=("user:inference", "user:profile"), refresh_token_expires_at=77), LATER)
    assert conn.credentials == Credentials("new-access", "new-refresh")
    assert (conn.state, conn.refresh_failures, conn.next_refresh_at, conn.last_refresh_error) == (
        "connected", 0, None, None)
    assert (conn.version, conn.expires_at, conn.scopes) == (3, 9000, ("user:inference", "user:profile"))
    assert conn.refresh_token_expires_at == 77 and conn.refreshed_at == LATER

    conn.refreshed(_tokens(access_token="third", refresh_token=None), LATER)  # server did not rotate
    assert conn.credentials == Credentials("third", "new-refresh")
    assert conn.scopes == ("user:inference", "user:profile") and conn.refresh_token_expires_at == 77


def test_invalid_grant_requires_reconnect_and_a_new_login_heals_it() -> None:
    conn = _connection()
    conn.require_reconnect("invalid_grant", NOW)
    assert (conn.state, conn.last_refresh_error, conn.refreshable) == ("reconnect_required", "invalid_grant", False)
    conn.refresh_failed("upstream_error", retry_at_ms=1, now=NOW)  # a late transient failure ...
    assert conn.state == "reconnect_required"  # ... does not hide the need to reconnect
    conn.reconnect(_login(credentials=Credentials("a", "r"), expires_at=1, refresh_token_expires_at=None, account=None,
                          issued_at=LATER), now=LATER)
    assert (conn.state, conn.refresh_failures, conn.issued_at) == ("connected", 0, LATER)


def test_an_older_login_does_not_supersede() -> None:
    conn = _connection(issued_at=LATER)
    assert conn.supersedes(LATER) and not conn.supersedes(NOW)


def test_backoff_grows_is_capped_jittered_and_honours_retry_after() -> None:
    rng = random.Random(7)
    delays = [refresh_backoff_s(n, base_s=10, cap_s=100, rng=rng) for n in (1, 2, 3, 4, 5, 9)]
    ceilings = [10, 20, 40, 80, 100, 100]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    spread = {round(refresh_backoff_s(3, base_s=10, cap_s=100, rng=rng), 3) for _ in range(20)}
    assert len(spread) > 10  # replicas do not retry in lockstep
    assert refresh_backoff_s(1, base_s=10, cap_s=100, retry_after_s=60, rng=rng) >= 60
    assert refresh_backoff_s(1, base_s=10, cap_s=100, retry_after_s=6000, rng=rng) <= 100


def test_login_warning_is_due_once_per_login_expiry() -> None:
    conn = _connection(refresh_token_expires_at=100_000)
    assert not conn.login_warning_due(now_ms=10_000, warn_before_ms=50_000)
    assert conn.login_warning_due(now_ms=60_000, warn_before_ms=50_000)
    conn.login_warned_for = 100_000
    assert not conn.login_warning_due(now_ms=60_000, warn_before_ms=50_000)
    conn.refresh_token_expires_at = 200_000  # a new login
    assert conn.login_warning_due(now_ms=160_000, warn_before_ms=50_000)


def test_audit_entries_cannot_carry_secrets() -> None:
    entry = AuditEntry(actor="vault:x", action="refresh_failed", reason=f"upstream said {ACCESS}",
                       detail={"note": f"Bearer {REFRESH}", "count": 3})
    shown = repr(entry) + str(entry.detail)
    assert ACCESS not in shown and REFRESH not in shown and entry.detail["count"] == 3
    with pytest.raises(TypeError):
        AuditEntry(actor="a", action="b", detail={"nested": {"access_token": ACCESS}})
    assert len(AuditEntry(actor="a" * 500, action="b").actor) == 128


def test_refreshed_tokens_repr_hides_tokens() -> None:
    shown = repr(_tokens(access_token=ACCESS, refresh_token=REFRESH))
    assert ACCESS not in shown and REFRESH not in shown and "rotated=True" in shown


def test_refresher_and_metrics_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OAUTH_TOKEN_URL", "OAUTH_TOKEN_URLS", "OAUTH_CLIENT_ID", "VAULT_REFRESH_MARGIN_S", "VAULT_METRICS_PORT",
                 "VAULT_REFRESH_LEASE_S", "VAULT_REFRESH_TIMEOUT_S", "VAULT_KEK_FILE", "CCBRIDGE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    defaults = VaultSettings()
    assert defaults.oauth_token_url is None
    assert defaults.token_url == "https://platform.claude.com/v1/oauth/token"
    assert defaults.oauth_client_id == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    assert (defaults.refresh_margin_s, defaults.metrics_port) == (600, 9100)
    assert defaults.kek_path == defaults.keys_dir / "vault-kek.json"
    with pytest.raises(ValueError, match="VAULT_REFRESH_LEASE_S"):
        VaultSettings(VAULT_REFRESH_LEASE_S=10, VAULT_REFRESH_TIMEOUT_S=15)


def test_trust_store_reloads_on_an_unknown_key_rate_limited(tmp_path) -> None:
    from services.vault.trust import TrustStore

    now = [0.0]
    first, late = KeyPair.generate(), KeyPair.generate()
    (tmp_path / "sandbox-1.hpke.pub").write_text(first.recipient.public_b64)
    store = TrustStore(None, tmp_path, min_interval_s=5.0, clock=lambda: now[0])
    assert store.recipient(first.recipient.public_b64, first.key_id).key_id == first.key_id

    (tmp_path / "sandbox-2.hpke.pub").write_text(late.recipient.public_b64)  # a replica started later
    now[0] = 1.0
    with pytest.raises(UnauthorizedRequester):  # a reload happened at start (t=0): too soon
        store.recipient(late.recipient.public_b64, late.key_id)
    now[0] = 6.0
    assert store.recipient(late.recipient.public_b64, late.key_id).key_id == late.key_id  # re-read, trusted
    stranger = KeyPair.generate()
    now[0] = 7.0
    with pytest.raises(UnauthorizedRequester):
        store.recipient(stranger.recipient.public_b64, stranger.key_id)
    assert store.reloads == 1

    (tmp_path / "sandbox-1.hpke.pub").unlink()  # decommissioned: the periodic reload drops it
    assert store.reload(force=True)
    with pytest.raises(UnauthorizedRequester):
        store.recipient(first.recipient.public_b64, first.key_id)


@pytest.mark.parametrize(
    ("url", "env", "fetch_batch", "request_concurrency"),
    [
        ("sqlite+aiosqlite:///var/vault.db", {}, 1, 1),  # one writer; a grant is one short thread call
        ("postgresql+asyncpg://vault@db/vault", {}, 16, 16),
        ("sqlite+aiosqlite:///var/vault.db", {"VAULT_FETCH_BATCH": "8", "VAULT_REQUEST_CONCURRENCY": "12"}, 8, 12),
    ],
)
def test_sqlite_defaults_for_batch_and_concurrency_yield_to_explicit_settings(
    url: str, env: dict[str, str], fetch_batch: int, request_concurrency: int
) -> None:
    from services.vault.settings import VaultSettings

    settings = VaultSettings(DATABASE_URL=url, **env)
    assert settings.effective_fetch_batch == fetch_batch
    assert settings.effective_request_concurrency == request_concurrency


def test_vault_and_auth_agree_on_the_token_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vault refreshes and revokes where auth exchanges first: OAUTH_TOKEN_URL if set, else the
    first of OAUTH_TOKEN_URLS — both read through shared.oauth."""
    from services.auth.settings import AuthSettings

    for name in ("OAUTH_TOKEN_URL", "OAUTH_TOKEN_URLS", "AUTH_JWT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    cases = [
        ({}, "https://platform.claude.com/v1/oauth/token"),
        ({"OAUTH_TOKEN_URLS": " http://b/token , http://a/token"}, "http://b/token"),
        ({"OAUTH_TOKEN_URL": "http://x/token", "OAUTH_TOKEN_URLS": "http://b/token"}, "http://x/token"),
        ({"OAUTH_TOKEN_URL": " ", "OAUTH_TOKEN_URLS": "http://b/token"}, "http://b/token"),
    ]
    for env, expected in cases:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            assert VaultSettings().token_url == expected, env
            assert AuthSettings().token_urls[0] == expected, env
    monkeypatch.setenv("OAUTH_TOKEN_URLS", "ftp://nope")
    with pytest.raises(ValueError, match="OAUTH_TOKEN_URLS"):
        VaultSettings()
