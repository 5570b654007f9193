"""ccbridge.nats_users: the data dir's NATS passwords (0600, generated once, reused) and URLs that
are safe to print."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from ccbridge import nats_users


def test_passwords_are_generated_once_private_and_reused(tmp_path: Path) -> None:
    first = nats_users.load_or_create_passwords(tmp_path)
    assert set(first) == set(nats_users.USERS)
    assert all(len(p) == 64 and int(p, 16) >= 0 for p in first.values())  # hex: safe inside a URL
    assert len(set(first.values())) == len(first)
    path = nats_users.users_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert nats_users.load_or_create_passwords(tmp_path) == first


def test_a_user_added_later_gets_a_password_and_the_others_keep_theirs(tmp_path: Path) -> None:
    path = nats_users.users_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"passwords": {"vault": "aa" * 32}}))
    passwords = nats_users.load_or_create_passwords(tmp_path)
    assert passwords["vault"] == "aa" * 32 and set(passwords) == set(nats_users.USERS)


def test_nats_url_for_a_running_stack(tmp_path: Path) -> None:
    passwords = nats_users.load_or_create_passwords(tmp_path)
    with pytest.raises(RuntimeError, match="no embedded nats-server"):
        nats_users.nats_url_for(tmp_path, "ops")
    nats_users.record_server(tmp_path, "nats://127.0.0.1:4567")
    assert nats_users.nats_url_for(tmp_path, "vault") == f"nats://vault:{passwords['vault']}@127.0.0.1:4567"
    with pytest.raises(KeyError):
        nats_users.nats_url_for(tmp_path, "mallory")
    nats_users.record_server(tmp_path, None)
    with pytest.raises(RuntimeError):
        nats_users.nats_url_for(tmp_path, "ops")
    assert nats_users.load_or_create_passwords(tmp_path) == passwords


@pytest.mark.parametrize(
    ("url", "printed"),
    [
        ("nats://ops:s3cret@127.0.0.1:4222", "nats://ops:***@127.0.0.1:4222"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://s3cret@nats:4222", "nats://***@nats:4222"),  # a token
        ("nats://a:s3cret@n1:4222, nats://a:s3cret@n2", "nats://a:***@n1:4222,nats://a:***@n2"),
    ],
)
def test_redacted_urls_hold_no_secret(url: str, printed: str) -> None:
    assert nats_users.redact_url(url) == printed


def test_the_rendered_config_is_the_committed_one_but_for_the_store(tmp_path: Path) -> None:
    config = nats_users.render_nats_config(tmp_path / "conf", store_dir=tmp_path / "store")
    committed = (nats_users.NATS_CONFIG_DIR / "nats.conf").read_text()
    assert config.read_text() == committed.replace('store_dir: "/data"', f'store_dir: "{tmp_path / "store"}"')
    assert (tmp_path / "conf" / "accounts.conf").read_text() == (nats_users.NATS_CONFIG_DIR / "accounts.conf").read_text()
    assert "$NATS_OPS_PASSWORD" in (tmp_path / "conf" / "accounts.conf").read_text()  # passwords stay in the env
