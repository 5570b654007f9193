"""Connection aggregate, credentials value object, trust set and settings of the vault."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.vault.domain import Account, Connection, Credentials
from services.vault.errors import InvalidKeyring, InvalidRequest, ReconnectRequired, UnauthorizedRequester
from services.vault.settings import VaultSettings
from services.vault.trust import TrustedRequesters
from shared.sealing import KeyPair

NOW = datetime(2026, 11, 1, tzinfo=UTC)
LATER = datetime(2026, 11, 2, tzinfo=UTC)
ACCESS = "sk-ant-oat01-ACCESS-secret-value"
REFRESH = "sk-ant-ort01-REFRESH-secret-value"


def _connection(**overrides: object) -> Connection:
    values: dict = {
        "user_id": "user-1",
        "kind": "oauth",
        "credentials": Credentials(ACCESS, REFRESH),
        "scopes": ["user:inference"],
        "expires_at": 1000,
        "refresh_token_expires_at": 5000,
        "account": Account(email="a@example.com"),
        "now": NOW,
    }
    values.update(overrides)
    return Connection.connect(**values)


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
    conn.reconnect(
        kind="oauth",
        credentials=Credentials("new-access", "new-refresh"),
        scopes=["user:inference", "user:profile"],
        expires_at=2000,
        refresh_token_expires_at=None,
        account=None,
        now=LATER,
    )
    assert conn.version == 2
    assert conn.state == "connected"
    assert conn.credentials == Credentials("new-access", "new-refresh")
    assert conn.expires_at == 2000 and conn.updated_at == LATER and conn.created_at == NOW
    assert conn.account == Account(email="a@example.com")  # kept when the new event has none


@pytest.mark.parametrize(("mode", "refresh"), [("file", REFRESH), ("access_only", None), ("env", None)])
def test_grant_only_file_mode_releases_the_refresh_token(mode: str, refresh: str | None) -> None:
    grant = _connection().grant(mode)  # type: ignore[arg-type]
    assert grant.credentials.access_token == ACCESS
    assert grant.credentials.refresh_token == refresh
    assert (grant.expires_at, grant.scopes) == (1000, ("user:inference",))


def test_refresh_failed_still_grants_but_reconnect_required_does_not() -> None:
    conn = _connection()
    conn.state = "refresh_failed"
    assert conn.grant("file").credentials.access_token == ACCESS
    conn.state = "reconnect_required"
    with pytest.raises(ReconnectRequired) as info:
        conn.grant("access_only")
    assert info.value.reason == "reconnect_required"


def test_setup_token_connection_cannot_refresh() -> None:
    conn = _connection(kind="setup_token", credentials=Credentials("sk-ant-oat01-year"))
    assert not conn.can_refresh
    assert conn.grant("file").credentials.refresh_token is None


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
