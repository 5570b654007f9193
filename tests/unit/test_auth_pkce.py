"""PKCE (RFC 7636) and login state."""

from __future__ import annotations

import re

import pytest

from services.auth.domain import PkcePair, is_valid_state, new_state, s256_challenge
from services.auth.login import LoginPolicy, build_authorize_url


def test_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert PkcePair.from_verifier(verifier).challenge == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_generated_verifiers_are_valid_and_distinct() -> None:
    pairs = [PkcePair.generate() for _ in range(50)]
    for pair in pairs:
        assert 43 <= len(pair.verifier) <= 128
        assert re.fullmatch(r"[A-Za-z0-9\-._~]+", pair.verifier)
        assert pair.challenge == s256_challenge(pair.verifier)
        assert len(pair.challenge) == 43 and "=" not in pair.challenge
        assert pair.method == "S256"
    assert len({p.verifier for p in pairs}) == 50


@pytest.mark.parametrize("bad", ["short", "x" * 129, "a" * 42 + "!", "é" * 50])
def test_verifier_rules(bad: str) -> None:
    with pytest.raises(ValueError):
        PkcePair.from_verifier(bad)


def test_verifier_hidden_from_repr() -> None:
    pair = PkcePair.generate()
    assert pair.verifier not in repr(pair)


def test_state_is_random_valid_and_not_the_verifier() -> None:
    states = {new_state() for _ in range(50)}
    assert len(states) == 50
    assert all(is_valid_state(s) for s in states)
    assert not is_valid_state("../etc")
    assert not is_valid_state("a.b.c.d.e.f.g.h.i")
    assert not is_valid_state("short")


def test_authorize_url_carries_the_real_cli_query() -> None:
    from urllib.parse import parse_qs, urlsplit

    policy = LoginPolicy(
        authorize_url="https://claude.com/cai/oauth/authorize",
        redirect_uri="https://platform.claude.com/oauth/code/callback",
        client_id="9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        scopes=("user:profile", "user:inference"),
    )
    pkce = PkcePair.generate()
    url = build_authorize_url(policy, pkce, "st4te-st4te-st4te-st4te")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == policy.authorize_url
    query = parse_qs(parts.query)
    assert list(query) == [
        "code", "client_id", "response_type", "redirect_uri", "scope", "code_challenge", "code_challenge_method", "state"
    ]
    assert query["code"] == ["true"]
    assert query["scope"] == ["user:profile user:inference"]
    assert query["code_challenge"] == [pkce.challenge]
    assert query["code_challenge_method"] == ["S256"]
    assert pkce.verifier not in url
