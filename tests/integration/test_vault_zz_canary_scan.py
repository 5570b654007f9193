"""Runs after the other vault tests (file order): scans every database file and log the vault
tests left behind — SQLite files, the logs of every vault process, the in-process log tee —
for any of the canary tokens the tests used. (PostgreSQL schemas are scanned as each test's
schema is dropped: tests/vault_fixtures.vault_db.)"""

from __future__ import annotations

import pytest

from tests.vault_fixtures import ARTIFACTS, CANARIES, LOG_TEE, SCANNED, USERS, leaked, vault_log_tee  # noqa: F401


def test_no_plaintext_token_in_any_database_or_log() -> None:
    files = sorted(p for p in ARTIFACTS if p.exists() and p.is_file())
    databases = [p for p in files if p.suffix == ".db"]
    logs = [p for p in files if p.suffix == ".log"]
    if not databases or not CANARIES:
        pytest.skip("nothing to scan: run this file together with the vault suite")

    leaks: dict[str, list[str]] = {}
    users_seen = 0
    for path in files:
        data = path.read_bytes()
        if found := leaked(data):
            leaks[str(path)] = found[:3]
        users_seen += sum(1 for user in USERS if user.encode() in data)

    assert leaks == {}, f"plaintext tokens found: {leaks}"
    # positive control: the scan read real vault data and real logs, not empty files
    assert users_seen > 0 and LOG_TEE in files and logs
    print(f"canary scan: {len(CANARIES)} tokens, {len(databases)} SQLite files, {len(logs)} logs, "
          f"{SCANNED['postgres_schemas']} PostgreSQL schemas: clean")


def test_the_scanner_finds_planted_tokens(tmp_path) -> None:
    from tests.vault_fixtures import canary, opaque_canary

    shaped, opaque = canary("plant"), opaque_canary("plant")
    assert leaked(b"\x00\x01" + shaped.encode() + b"\xff") == [shaped]
    assert leaked("\\x" + opaque.encode().hex()) == [opaque]  # bytea, as PostgreSQL prints it
    assert leaked(b"CANARYsomethingelse0123456789") == []
