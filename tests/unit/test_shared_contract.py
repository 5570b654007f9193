"""The shared contract: event models, JSON Schemas in docs/, and HPKE sealing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ccbridge import schemas
from shared import subjects
from shared.events import EVENT_MODELS, SandboxCreated, TokenBundle, derived_event_id
from shared.sealing import KeyPair, SealingError, open_sealed, seal

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE = re.compile(r"<!-- example: ([\w./]+) -->\s*```json\n(.*?)```", re.S)


def test_committed_schemas_are_current() -> None:
    committed = {str(p.relative_to(schemas.SCHEMA_ROOT)): p.read_text() for p in schemas.SCHEMA_ROOT.glob("v*/*.json")}
    assert committed == schemas.render(), "docs/schemas is stale: run `python -m ccbridge.schemas`"


def test_every_public_subject_has_a_schema() -> None:
    names = {p.name.removesuffix(".json") for p in schemas.SCHEMA_DIR.glob("*.json")}
    public = {v for k, v in vars(subjects).items() if k.isupper() and isinstance(v, str) and "." in v}
    public.discard(subjects.VAULT_CREDENTIALS_GET)
    public.discard(subjects.VAULT_CONNECTIONS_STATUS)  # request/reply: .request/.reply schemas
    public.discard(subjects.VAULT_GRANTS_LIST)
    assert public <= names


def test_doc_examples_validate_against_schemas() -> None:
    examples = EXAMPLE.findall((DOCS / "events.md").read_text())
    named = {(name if "/" in name else f"v1/{name}") for name, _ in examples}
    assert named == set(schemas.all_models())
    for name, body in examples:
        schema = json.loads((schemas.SCHEMA_ROOT / f"{name if '/' in name else 'v1/' + name}.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(json.loads(body))


def test_schema_rejects_what_the_model_rejects() -> None:
    schema = json.loads((schemas.SCHEMA_DIR / "sandbox.created.json").read_text())
    bad = {"event_id": "abcdefgh12", "user_id": "u", "sandbox_id": "../etc", "backend": "local"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ValidationError):
        SandboxCreated.model_validate(bad)


@pytest.mark.parametrize("sandbox_id", ["..", "a/b", "-x", "", "a" * 200, "a..b", "x\n"])
def test_sandbox_id_cannot_escape_the_root(sandbox_id: str) -> None:
    with pytest.raises(ValidationError):
        SandboxCreated(user_id="u", sandbox_id=sandbox_id)


def test_token_bundle_repr_hides_tokens() -> None:
    bundle = TokenBundle(access_token="sk-ant-oat01-secretvalue", refresh_token="sk-ant-ort01-other", expires_at=1)
    assert "secretvalue" not in repr(bundle) and "other" not in str(bundle)


def test_event_models_registered_for_every_stream_subject() -> None:
    assert subjects.SANDBOX_CREATED in EVENT_MODELS and subjects.TOKENS_ISSUED in EVENT_MODELS


def test_derived_event_ids_are_stable_and_distinct() -> None:
    assert derived_event_id("abc", "injected") == derived_event_id("abc", "injected")
    assert derived_event_id("abc", "injected") != derived_event_id("abc", "failed")
    assert derived_event_id("abc", "injected") != derived_event_id("abd", "injected")


class TestSealing:
    key = KeyPair.generate()

    def test_round_trip(self) -> None:
        box = seal(b"payload", self.key.recipient, subject="tokens.issued", message_id="evt-1")
        assert open_sealed(box, self.key, subject="tokens.issued", message_id="evt-1") == b"payload"
        assert b"payload" not in box.ciphertext.encode()

    @pytest.mark.parametrize(("subject", "message_id"), [("tokens.refreshed", "evt-1"), ("tokens.issued", "evt-2")])
    def test_box_is_bound_to_subject_and_message(self, subject: str, message_id: str) -> None:
        box = seal(b"payload", self.key.recipient, subject="tokens.issued", message_id="evt-1")
        with pytest.raises(SealingError):
            open_sealed(box, self.key, subject=subject, message_id=message_id)

    def test_other_key_cannot_open(self) -> None:
        other = KeyPair.generate()
        box = seal(b"payload", self.key.recipient, subject="s", message_id="m")
        with pytest.raises(SealingError):
            open_sealed(box, other, subject="s", message_id="m")
        forged = box.model_copy(update={"key_id": other.key_id})
        with pytest.raises(SealingError):
            open_sealed(forged, other, subject="s", message_id="m")

    @given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
    def test_any_tampering_is_detected(self, position: int, flip: int) -> None:
        from shared.sealing import b64d, b64e

        box = seal(b"payload", self.key.recipient, subject="s", message_id="m")
        raw = bytearray(b64d(box.ciphertext))
        raw[position % len(raw)] ^= flip or 1
        tampered = box.model_copy(update={"ciphertext": b64e(bytes(raw))})
        with pytest.raises(SealingError):
            open_sealed(tampered, self.key, subject="s", message_id="m")

    def test_private_key_never_in_repr(self) -> None:
        assert self.key.private_b64() not in repr(self.key)
