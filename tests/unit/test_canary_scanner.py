"""The canary scanner the vault suite runs at the end of every session (tests/vault_fixtures:
`scan_for_canaries`): it must find a planted token however it is stored."""

from __future__ import annotations

from tests.vault_fixtures import canary, leaked, opaque_canary


def test_the_scanner_finds_planted_tokens() -> None:
    shaped, opaque = canary("plant"), opaque_canary("plant")
    assert leaked(b"\x00\x01" + shaped.encode() + b"\xff") == [shaped]
    assert leaked("\\x" + opaque.encode().hex()) == [opaque]  # bytea, as PostgreSQL prints it
    assert leaked(b"CANARYsomethingelse0123456789") == []
