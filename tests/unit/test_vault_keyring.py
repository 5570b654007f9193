"""Envelope encryption of credential records (services.vault.keyring)."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace

import pytest

from services.vault.errors import DecryptionFailed, InvalidKeyring, UnknownKeyId
from services.vault.keyring import (
    KEK_FILE_NAME,
    Keyring,
    RecordContext,
    load_or_create_keyring,
)

SECRET = b'{"access_token":"sk-ant-oat01-canary-secret","refresh_token":"sk-ant-ort01-canary"}'
CTX = RecordContext("user-1", 1)


def _flip(data: bytes, index: int = -1) -> bytes:
    buf = bytearray(data)
    buf[index] ^= 0x01
    return bytes(buf)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_round_trip_and_fresh_randomness() -> None:
    keyring = Keyring.generate()
    first = keyring.encrypt(SECRET, CTX)
    second = keyring.encrypt(SECRET, CTX)

    assert keyring.decrypt(first, CTX) == SECRET
    assert keyring.decrypt(second, CTX) == SECRET
    assert first.kek_id == keyring.active_kek_id
    # a fresh data key and nonces per record: equal plaintexts give unrelated rows
    assert first.ciphertext != second.ciphertext
    assert first.wrapped_data_key != second.wrapped_data_key
    assert first.nonce != second.nonce
    assert len(first.nonce) == 12
    assert b"canary" not in first.ciphertext + first.wrapped_data_key


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_data_key", "nonce"])
def test_tampering_is_detected(field: str) -> None:
    keyring = Keyring.generate()
    record = keyring.encrypt(SECRET, CTX)
    tampered = replace(record, **{field: _flip(getattr(record, field))})

    with pytest.raises(DecryptionFailed):
        keyring.decrypt(tampered, CTX)


def test_truncated_wrapped_key_is_a_decryption_failure() -> None:
    keyring = Keyring.generate()
    record = keyring.encrypt(SECRET, CTX)
    with pytest.raises(DecryptionFailed):
        keyring.decrypt(replace(record, wrapped_data_key=record.wrapped_data_key[:8]), CTX)


@pytest.mark.parametrize("other", [RecordContext("user-2", 1), RecordContext("user-1", 2)])
def test_record_is_bound_to_user_and_version(other: RecordContext) -> None:
    keyring = Keyring.generate()
    record = keyring.encrypt(SECRET, CTX)

    with pytest.raises(DecryptionFailed):
        keyring.decrypt(record, other)


def test_record_is_bound_to_its_kek_id() -> None:
    """Relabelling a row with another (known) KEK id does not decrypt."""
    keyring = Keyring.generate()
    second = Keyring.new_kek_id()
    both = keyring.with_key(second, os.urandom(32), activate=False)
    record = both.encrypt(SECRET, CTX)

    with pytest.raises(DecryptionFailed):
        both.decrypt(replace(record, kek_id=second), CTX)


def test_unknown_kek_id() -> None:
    record = Keyring.generate().encrypt(SECRET, CTX)
    other = Keyring.generate()

    with pytest.raises(UnknownKeyId) as info:
        other.decrypt(record, CTX)
    assert info.value.kek_id == record.kek_id
    assert info.value.reason == "unknown_key_id"


def test_same_kek_id_but_different_key_fails_closed() -> None:
    kid = "kek-same"
    record = Keyring({kid: os.urandom(32)}, kid).encrypt(SECRET, CTX)
    with pytest.raises(DecryptionFailed):
        Keyring({kid: os.urandom(32)}, kid).decrypt(record, CTX)


def test_repr_and_str_never_show_key_material() -> None:
    key = os.urandom(32)
    keyring = Keyring({"kek-a": key}, "kek-a")
    record = keyring.encrypt(SECRET, CTX)
    shown = repr(keyring) + str(keyring) + repr(record) + str(record)

    assert "kek-a" in repr(keyring)
    for needle in (key.hex(), _b64(key), repr(key), repr(record.wrapped_data_key), repr(record.ciphertext)):
        assert needle not in shown


def test_rotation_rewrap_keeps_ciphertext_and_old_records_stay_readable() -> None:
    old = Keyring.generate()
    record = old.encrypt(SECRET, CTX)
    new_kid = Keyring.new_kek_id()
    rotated = old.with_key(new_kid, os.urandom(32))

    assert rotated.active_kek_id == new_kid
    assert rotated.decrypt(record, CTX) == SECRET  # old KEK still known

    rewrapped = rotated.rewrap(record, CTX)
    assert rewrapped.kek_id == new_kid
    assert rewrapped.ciphertext == record.ciphertext and rewrapped.nonce == record.nonce
    assert rotated.decrypt(rewrapped, CTX) == SECRET
    with pytest.raises(UnknownKeyId):
        old.decrypt(rewrapped, CTX)
    with pytest.raises(DecryptionFailed):
        rotated.rewrap(record, RecordContext("user-2", 1))


def test_json_round_trip() -> None:
    keyring = Keyring.generate().with_key("kek-2", os.urandom(32), activate=False)
    again = Keyring.from_json(keyring.export_json())
    record = keyring.encrypt(SECRET, CTX)

    assert again.active_kek_id == keyring.active_kek_id
    assert set(again.kek_ids) == set(keyring.kek_ids)
    assert again.decrypt(record, CTX) == SECRET


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"active": "a"}',
        '{"active": "a", "keys": {"b": "' + _b64(b"x" * 32) + '"}}',  # active not among keys
        '{"active": "a", "keys": {"a": "' + _b64(b"x" * 16) + '"}}',  # 128-bit key
        '{"active": "a", "keys": {"a": 5}}',
        '{"active": "a b", "keys": {"a b": "' + _b64(b"x" * 32) + '"}}',  # bad id
        '{"active": "a", "keys": {"a": "***"}}',
    ],
)
def test_malformed_keyring_is_a_typed_error(text: str) -> None:
    with pytest.raises(InvalidKeyring):
        Keyring.from_json(text)


def test_error_messages_do_not_echo_key_material() -> None:
    secret = _b64(b"s" * 16)
    with pytest.raises(InvalidKeyring) as info:
        Keyring.from_json('{"active": "a", "keys": {"a": "' + secret + '"}}')
    assert secret not in str(info.value)


def test_load_or_create_writes_a_private_file_once(tmp_path) -> None:
    keys_dir = tmp_path / "keys"
    first = load_or_create_keyring(keys_dir)
    path = keys_dir / KEK_FILE_NAME

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["active"] == first.active_kek_id and list(doc["keys"]) == [first.active_kek_id]

    second = load_or_create_keyring(keys_dir)
    record = first.encrypt(SECRET, CTX)
    assert second.decrypt(record, CTX) == SECRET  # same key loaded, not a new one


def test_env_value_wins_over_the_file(tmp_path) -> None:
    from_env = Keyring.generate()
    loaded = load_or_create_keyring(tmp_path, env_value=from_env.export_json())

    assert loaded.active_kek_id == from_env.active_kek_id
    assert not (tmp_path / KEK_FILE_NAME).exists()

