"""Envelope encryption of credential records (services.vault.keyring)."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace

import pytest

from services.vault.errors import DecryptionFailed, InvalidKeyring, KeySourceReadOnly, RetiredKeyId, UnknownKeyId
from services.vault.keyring import (
    KEK_FILE_NAME,
    EnvKekSource,
    FileKekSource,
    Keyring,
    LiveKeyring,
    RecordContext,
    kek_source,
    load_or_create_keyring,
    require_writable,
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



# --- retirement, sources, the live keyring ------------------------------------------------
def test_retired_key_fails_loudly_and_is_remembered() -> None:
    old = Keyring.generate()
    record = old.encrypt(SECRET, CTX)
    rotated = old.with_new_key()
    retired = rotated.retire(old.active_kek_id)

    with pytest.raises(RetiredKeyId) as info:
        retired.decrypt(record, CTX)
    assert info.value.kek_id == old.active_kek_id and info.value.retired_at
    assert old.active_kek_id not in retired.kek_ids and old.active_kek_id in retired.retired
    again = Keyring.from_json(retired.export_json())  # survives the file round trip
    with pytest.raises(RetiredKeyId):
        again.decrypt(record, CTX)
    with pytest.raises(InvalidKeyring):
        retired.retire(retired.active_kek_id)  # the active key cannot be retired
    with pytest.raises(InvalidKeyring):
        retired.with_key(old.active_kek_id, os.urandom(32))  # a retired id is never reused


def test_rewrap_refuses_a_tampered_record() -> None:
    old = Keyring.generate()
    record = old.encrypt(SECRET, CTX)
    rotated = old.with_new_key()
    with pytest.raises(DecryptionFailed):
        rotated.rewrap(replace(record, ciphertext=_flip(record.ciphertext)), CTX)


def test_env_source_is_read_only(tmp_path) -> None:
    ring = Keyring.generate()
    source = kek_source(tmp_path, env_value=ring.export_json())
    assert isinstance(source, EnvKekSource) and source.fingerprint() is None
    assert source.load().active_kek_id == ring.active_kek_id
    assert ring.export_json() not in repr(source)
    with pytest.raises(KeySourceReadOnly):
        require_writable(source)


def test_file_source_updates_atomically_and_privately(tmp_path) -> None:
    source = kek_source(tmp_path)
    assert isinstance(source, FileKekSource)
    first = source.load()  # created on first use
    before = source.fingerprint()

    updated = require_writable(source).update(lambda ring: ring.with_new_key())

    assert updated.active_kek_id != first.active_kek_id
    assert set(source.load().kek_ids) == {first.active_kek_id, updated.active_kek_id}
    assert stat.S_IMODE(source.path.stat().st_mode) == 0o600
    assert source.fingerprint() != before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_live_keyring_reloads_on_unknown_key_id_and_follows_the_file(tmp_path) -> None:
    source = FileKekSource(tmp_path / KEK_FILE_NAME)
    clock = _Clock()
    reloads: list[tuple[str, str]] = []
    live = LiveKeyring(source, check_interval_s=5.0, min_reload_interval_s=1.0, clock=clock,
                       on_reload=lambda old, new: reloads.append((old.active_kek_id, new.active_kek_id)))
    first = live.active_kek_id

    # another process rotates and re-wraps a record under the new key
    rotated = source.update(lambda ring: ring.with_new_key())
    record = rotated.encrypt(SECRET, CTX)
    clock.now = 2.0  # before the periodic check: the unknown id triggers the reload
    assert live.decrypt(record, CTX) == SECRET
    assert reloads == [(first, rotated.active_kek_id)]

    # writes follow the file within the check interval
    newer = source.update(lambda ring: ring.with_new_key())
    clock.now = 3.0
    assert live.encrypt(SECRET, CTX).kek_id == rotated.active_kek_id  # not checked yet
    clock.now = 7.5
    assert live.encrypt(SECRET, CTX).kek_id == newer.active_kek_id


def test_live_keyring_rate_limits_reloads_and_keeps_the_last_good_set(tmp_path) -> None:
    source = FileKekSource(tmp_path / KEK_FILE_NAME)
    clock = _Clock()
    errors: list[Exception] = []
    live = LiveKeyring(source, check_interval_s=1.0, min_reload_interval_s=1.0, clock=clock,
                       on_error=errors.append)
    record = Keyring.generate().encrypt(SECRET, CTX)  # a key nobody has
    clock.now = 5.0
    with pytest.raises(UnknownKeyId):
        live.decrypt(record, CTX)
    loads_before = live.reloads
    with pytest.raises(UnknownKeyId):
        live.decrypt(record, CTX)  # within min_reload_interval: no second file read
    assert live.reloads == loads_before

    good = live.active_kek_id
    source.path.write_text("{ broken")
    clock.now = 10.0
    assert live.encrypt(SECRET, CTX).kek_id == good  # the broken file is not adopted
    assert errors and isinstance(errors[0], InvalidKeyring)
    assert source.path.read_text() not in repr(live)
