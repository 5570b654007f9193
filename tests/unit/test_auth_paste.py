"""Parsing what people paste after authorizing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.auth.domain import PastedCode, parse_legacy_paste, parse_paste, parse_setup_token
from services.auth.errors import AuthError, InvalidPaste, InvalidSetupToken

STATE = "q5S7l0m0xY8c6pE0XJv7Yb0rQm9bV3wH2tXo1kZ4cGs"


@pytest.mark.parametrize(
    ("code", "state", "expected"),
    [
        (f"abc123#{STATE}", None, ("abc123", STATE)),
        (f"  abc123#{STATE}\n", None, ("abc123", STATE)),
        (f"\tabc123 # {STATE} ", None, ("abc123", STATE)),
        ("abc123", STATE, ("abc123", STATE)),
        ("abc123", f"  {STATE}  ", ("abc123", STATE)),
        (f"abc123#{STATE}", STATE, ("abc123", STATE)),
        ("abc123#", STATE, ("abc123", STATE)),
        (f"https://platform.claude.com/oauth/code/callback?code=abc123&state={STATE}", None, ("abc123", STATE)),
        ("https://platform.claude.com/oauth/code/callback?code=abc123", STATE, ("abc123", STATE)),
    ],
)
def test_accepted_shapes(code: str, state: str | None, expected: tuple[str, str]) -> None:
    parsed = parse_paste(code, state)
    assert (parsed.code, parsed.state) == expected


@pytest.mark.parametrize(
    ("code", "state"),
    [
        ("", None),
        ("   ", None),
        ("abc123", None),  # no state anywhere
        ("abc123#", None),
        (f"#{STATE}", None),  # no code
        (f"a#b#{STATE}", None),
        (f"abc123#{STATE}", "another-state-entirely-xx"),
        ("abc 123#" + STATE, None),  # whitespace inside the code
        ("abc\x00#" + STATE, None),
        ("x" * 5000 + "#" + STATE, None),
        ("abc#" + "s" * 600, None),
        ("https://example.com/callback?state=" + STATE, None),
        ("https://example.com/callback?code=a&code=b&state=" + STATE, None),
    ],
)
def test_rejected_shapes(code: str, state: str | None) -> None:
    with pytest.raises(InvalidPaste) as caught:
        parse_paste(code, state)
    assert caught.value.status == 400
    assert "abc123" not in caught.value.detail  # never echoes the code


def test_repr_hides_the_code() -> None:
    parsed = parse_paste(f"secretcode123#{STATE}")
    assert "secretcode123" not in repr(parsed)


@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=80)))
def test_any_input_parses_or_raises_the_typed_error(code: str, state: str | None) -> None:
    try:
        parsed = parse_paste(code, state)
    except InvalidPaste:
        return
    assert isinstance(parsed, PastedCode)
    assert parsed.code and parsed.state
    assert parsed.code == parsed.code.strip() and "#" not in parsed.code
    assert all(0x21 <= ord(ch) <= 0x7E for ch in parsed.code + parsed.state)


@given(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), min_size=1, max_size=200),
    st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True),
    st.sampled_from(["", " ", "\n", "\t "]),
)
def test_round_trip_of_well_formed_pastes(code: str, state: str, pad: str) -> None:
    if code.lower().startswith(("http://", "https://")):
        return
    parsed = parse_paste(f"{pad}{code}#{state}{pad}")
    assert (parsed.code, parsed.state) == (code, state)


def test_non_string_input_is_a_typed_error() -> None:
    with pytest.raises(AuthError):
        parse_paste(None, None)


# --- the seed's `code#verifier` ------------------------------------------------------------------
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"


def test_legacy_paste_accepted() -> None:
    parsed = parse_legacy_paste(f"  abc123#{VERIFIER}\n")
    assert (parsed.code, parsed.verifier) == ("abc123", VERIFIER)
    assert "abc123" not in repr(parsed) and VERIFIER not in repr(parsed)


@pytest.mark.parametrize(
    "text",
    ["", "abc123", f"#{VERIFIER}", "abc123#short", f"abc123#{VERIFIER}#x", f"abc 123#{VERIFIER}",
     "abc123#" + "v" * 129, f"abc123#{VERIFIER[:-1]}!", "x" * 5000],
)
def test_legacy_paste_rejected(text: str) -> None:
    with pytest.raises(InvalidPaste) as caught:
        parse_legacy_paste(text)
    assert "abc123" not in caught.value.detail and VERIFIER not in caught.value.detail


@given(st.text(max_size=300))
def test_legacy_paste_parses_or_raises_the_typed_error(text: str) -> None:
    try:
        parsed = parse_legacy_paste(text)
    except InvalidPaste:
        return
    assert 43 <= len(parsed.verifier) <= 128 and parsed.code and "#" not in parsed.code


# --- `claude setup-token` tokens -----------------------------------------------------------------
def test_setup_token_accepted_and_trimmed() -> None:
    token = "sk-ant-oat01-" + "Ab_-9" * 20
    assert parse_setup_token(f"  {token}\n") == token


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("sk-ant-ort01-" + "r" * 60, "refresh token"),
        ("sk-ant-api03-" + "k" * 60, "API key"),
        ("sk-ant-oat01-short", "setup-token"),
        ("sk-ant-oat01-" + "x" * 60 + " tail", "setup-token"),
        ("eyJhbGciOiJIUzI1NiJ9.e30.sig", "setup-token"),
        ("", "setup-token"),
    ],
)
def test_setup_token_rejected_with_a_reason(text: str, hint: str) -> None:
    with pytest.raises(InvalidSetupToken) as caught:
        parse_setup_token(text)
    assert caught.value.status == 400 and hint in caught.value.detail
    assert text[13:] not in caught.value.detail or not text[13:]


@given(st.text(max_size=200))
def test_setup_token_parses_or_raises_the_typed_error(text: str) -> None:
    try:
        token = parse_setup_token(text)
    except InvalidSetupToken:
        return
    assert token.startswith("sk-ant-oat01-") and token == token.strip()
