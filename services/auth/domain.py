"""Pure domain of the login flow: PKCE (RFC 7636), login state, pending logins, paste parsing.
No I/O here."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

from services.auth.errors import InvalidPaste, InvalidSetupToken

# RFC 7636 §4.1: 43..128 chars of [A-Z a-z 0-9 - . _ ~]
VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
# States we issue are token_urlsafe(32) (43 chars); accept a range, and nothing a NATS KV key
# or a log line could trip over.
STATE_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# Codes are opaque to us; bound them and refuse whitespace/control characters.
CODE_RE = re.compile(r"^[\x21-\x7e]{1,2048}$")
MAX_PASTE = 4096
# `claude setup-token` prints `sk-ant-oat01-` + base64url; bound it and refuse anything else.
SETUP_TOKEN_RE = re.compile(r"^sk-ant-oat01-[A-Za-z0-9_-]{16,1024}$")
SETUP_TOKEN_LIFETIME_S = 365 * 24 * 3600  # ~1 year, as the CLI reports; the token itself does not say
SETUP_TOKEN_SCOPES = ("user:inference",)
CREATE_API_KEY_SCOPE = "org:create_api_key"
ACCOUNT_TYPES = ("claude_ai", "console")


def s256_challenge(verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class PkcePair:
    verifier: str = field(repr=False)
    challenge: str
    method: str = "S256"

    @classmethod
    def from_verifier(cls, verifier: str) -> PkcePair:
        if not VERIFIER_RE.fullmatch(verifier):
            raise ValueError("a PKCE verifier is 43-128 characters of [A-Za-z0-9-._~]")
        return cls(verifier=verifier, challenge=s256_challenge(verifier))

    @classmethod
    def generate(cls) -> PkcePair:
        # token_urlsafe(64): 86 chars from the unreserved alphabet, 512 bits of entropy.
        return cls.from_verifier(secrets.token_urlsafe(64))


def new_state() -> str:
    """The OAuth `state`: independent of the verifier (never derived from it)."""
    return secrets.token_urlsafe(32)


def is_valid_state(state: str) -> bool:
    return bool(STATE_RE.fullmatch(state))


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class PendingLogin:
    """A login between `start_login` and `complete_login`: bound to the caller, single use."""

    state: str
    user_id: str
    verifier: str = field(repr=False)
    redirect_uri: str
    client_id: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    account_type: str = "claude_ai"
    rejected_codes: int = 0  # pastes the token endpoint refused with invalid_grant (a typo does not end it)

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "state": self.state,
                "user_id": self.user_id,
                "verifier": self.verifier,
                "redirect_uri": self.redirect_uri,
                "client_id": self.client_id,
                "scopes": list(self.scopes),
                "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat(),
                "account_type": self.account_type,
                "rejected_codes": self.rejected_codes,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PendingLogin:
        """Raises ValueError on anything that is not a record we wrote."""
        try:
            raw = json.loads(data)
            if raw.get("v") != 1:
                raise ValueError("unknown pending-login version")
            return cls(
                state=str(raw["state"]),
                user_id=str(raw["user_id"]),
                verifier=str(raw["verifier"]),
                redirect_uri=str(raw["redirect_uri"]),
                client_id=str(raw["client_id"]),
                scopes=tuple(str(s) for s in raw["scopes"]),
                created_at=_aware(datetime.fromisoformat(raw["created_at"])),
                expires_at=_aware(datetime.fromisoformat(raw["expires_at"])),
                account_type=str(raw.get("account_type", "claude_ai")),
                rejected_codes=int(raw.get("rejected_codes", 0)),
            )
        except (KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError("not a pending-login record") from exc


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class PastedCode:
    code: str = field(repr=False)
    state: str


def parse_paste(code: str, state: str | None = None) -> PastedCode:
    """Accept what people paste: `<code>#<state>`, or code and state apart, or the whole
    callback URL (`...?code=..&state=..`). Surrounding whitespace is ignored. Anything else
    is an `InvalidPaste` (never another exception)."""
    if not isinstance(code, str) or (state is not None and not isinstance(state, str)):
        raise InvalidPaste()
    text = code.strip()
    given_state = state.strip() if state is not None else None
    if not text or len(text) > MAX_PASTE:
        raise InvalidPaste()
    if text.lower().startswith(("http://", "https://")):
        text_code, text_state = _from_url(text)
    elif "#" in text:
        text_code, _, text_state = text.partition("#")
        if "#" in text_state:
            raise InvalidPaste("The pasted value has more than one #: paste exactly code#state.")
    else:
        text_code, text_state = text, None
    text_code = text_code.strip()
    text_state = (text_state.strip() or None) if text_state is not None else None
    if text_state is not None and given_state and text_state != given_state:
        raise InvalidPaste("The state in code#state differs from the state field.")
    final_state = text_state or given_state
    if not final_state:
        raise InvalidPaste("The state is missing: paste the whole code#state string.")
    if not CODE_RE.fullmatch(text_code):
        raise InvalidPaste("The code part is empty or contains characters a code never has.")
    if len(final_state) > 512 or not CODE_RE.fullmatch(final_state):
        raise InvalidPaste("The state part is not a valid state.")
    return PastedCode(code=text_code, state=final_state)


def _from_url(text: str) -> tuple[str, str | None]:
    try:
        query = parse_qs(urlsplit(text).query, keep_blank_values=False)
    except ValueError as exc:
        raise InvalidPaste() from exc
    codes, states = query.get("code", []), query.get("state", [])
    if len(codes) != 1 or len(states) > 1:
        raise InvalidPaste("The pasted URL carries no single code parameter.")
    return codes[0], (states[0] if states else None)


@dataclass(frozen=True)
class LegacyPaste:
    """`<code>#<verifier>` from a seed-era client that made its own PKCE pair and sent the
    verifier as the OAuth `state` (so the authorize page showed `code#verifier`)."""

    code: str = field(repr=False)
    verifier: str = field(repr=False)


def parse_legacy_paste(text: str) -> LegacyPaste:
    if not isinstance(text, str):
        raise InvalidPaste()
    text = text.strip()
    if not text or len(text) > MAX_PASTE or text.count("#") != 1:
        raise InvalidPaste("Send authorization_code as <code>#<verifier> (exactly one #).")
    code, _, verifier = (part.strip() for part in text.partition("#"))
    if not CODE_RE.fullmatch(code):
        raise InvalidPaste("The code part is empty or contains characters a code never has.")
    if not VERIFIER_RE.fullmatch(verifier):
        raise InvalidPaste("The part after # must be the PKCE verifier: 43-128 characters of [A-Za-z0-9-._~].")
    return LegacyPaste(code=code, verifier=verifier)


def parse_setup_token(text: str) -> str:
    """The long-lived token `claude setup-token` prints. Typed errors that never echo the input."""
    if not isinstance(text, str):
        raise InvalidSetupToken()
    token = text.strip()
    if SETUP_TOKEN_RE.fullmatch(token):
        return token
    if token.startswith("sk-ant-ort01-"):
        raise InvalidSetupToken("That is a refresh token; paste the token that claude setup-token printed (sk-ant-oat01-…).")
    if token.startswith("sk-ant-api"):
        raise InvalidSetupToken("That is an Anthropic API key, not a Claude Code token; run claude setup-token.")
    raise InvalidSetupToken()


@dataclass(frozen=True)
class TokenGrant:
    """What the token endpoint granted. repr hides the tokens."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int
    refresh_token_expires_in: int | None = None
    scopes: tuple[str, ...] | None = None
    account_uuid: str | None = None
    email: str | None = None
    organization_uuid: str | None = None
    organization_name: str | None = None


@dataclass(frozen=True)
class CodeExchange:
    """The authorization_code request, exactly the fields the real CLI sends."""

    code: str = field(repr=False)
    code_verifier: str = field(repr=False)
    state: str
    redirect_uri: str
    client_id: str
