"""ccbridge's NATS users (deploy/nats/accounts.conf) on a local nats-server.

`ccbridge up` (ccbridge.stack.Stack) runs its embedded nats-server with the same users and
permissions as production: the committed nats.conf + accounts.conf rendered into the data dir,
one generated password per user in `<data_dir>/nats/users.json` (0600; later starts of the same
data dir reuse them). nats-server reads the passwords from its environment, as in production, so
the rendered config files hold none. tests/nats_perms_fixtures.py starts its servers the same way.

    nats_url_for(data_dir, "ops")   # nats://ops:<password>@127.0.0.1:<port> of the running stack
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ccbridge.embedded_nats import EmbeddedNats, free_port
from ccbridge.files import write_private
from shared.settings import redact_url

__all__ = ["USERS", "nats_url_for", "redact_url", "user_url"]

# The committed config. `ccbridge up` is a development tool run from a checkout: the image and
# the wheel carry no deploy/ directory.
NATS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "deploy" / "nats"
USERS = ("auth", "vault", "sandbox", "platform", "ops")
# Inside the data dir: JetStream keeps <store>/jetstream here (as before users existed).
STORE_DIRNAME = "nats"


def password_env_name(user: str) -> str:
    """The variable accounts.conf reads that user's password from: NATS_<USER>_PASSWORD."""
    return f"NATS_{user.upper()}_PASSWORD"


def password_env(passwords: Mapping[str, str]) -> dict[str, str]:
    return {password_env_name(user): password for user, password in passwords.items()}


def render_nats_config(dest_dir: Path, *, store_dir: Path, source: Path = NATS_CONFIG_DIR) -> Path:
    """Copy deploy/nats/{nats,accounts}.conf into `dest_dir` with `store_dir` pointed elsewhere;
    returns the path of the main config. Everything else is byte-for-byte the committed file."""
    if not (source / "nats.conf").exists():
        raise FileNotFoundError(f"{source / 'nats.conf'} is missing: run `ccbridge up` from a ccbridge checkout")
    dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    main = (source / "nats.conf").read_text()
    rendered, count = re.subn(r'(?m)^(\s*store_dir:\s*).*$', lambda m: f'{m.group(1)}"{store_dir}"', main)
    if count != 1:
        raise ValueError(f"{source / 'nats.conf'} must set jetstream.store_dir exactly once")
    write_private(dest_dir / "nats.conf", rendered)
    write_private(dest_dir / "accounts.conf", (source / "accounts.conf").read_text())
    return dest_dir / "nats.conf"


def start_secured_nats(
    conf_dir: Path,
    store_dir: Path,
    passwords: Mapping[str, str],
    *,
    log_file: Path | None = None,
    port: int | None = None,
    http_port: int | None = None,
    die_with_parent: bool = False,
) -> EmbeddedNats:
    """A nats-server running the committed config with these passwords, on loopback. The config's
    fixed ports (4222, monitoring 8222) are replaced by free ones: a system NATS may hold them."""
    missing = set(USERS) - set(passwords)
    if missing:
        raise ValueError(f"passwords missing for {sorted(missing)}")
    config = render_nats_config(conf_dir, store_dir=store_dir)
    return EmbeddedNats(store_dir, port=port, log_file=log_file, config=config, env=password_env(passwords),
                        http_port=http_port or free_port(), die_with_parent=die_with_parent).start()


def _host_port(parts: SplitResult) -> str:
    return parts.netloc.rpartition("@")[2]


def user_url(address: str, user: str, password: str) -> str:
    """`nats://host:port` + a user → `nats://user:password@host:port` (passwords are hex)."""
    parts = urlsplit(address)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{_host_port(parts)}"))


# --- the data dir's users ---------------------------------------------------------------------
def users_file(data_dir: Path) -> Path:
    return Path(data_dir) / STORE_DIRNAME / "users.json"


def _read(data_dir: Path) -> dict:
    path = users_file(data_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def load_or_create_passwords(data_dir: Path) -> dict[str, str]:
    """Every user's password for this data dir: the stored ones, new ones for users not yet
    stored (hex, so they are safe inside a nats:// URL)."""
    stored = _read(data_dir)
    passwords: dict[str, str] = dict(stored.get("passwords", {}))
    if missing := [user for user in USERS if user not in passwords]:
        passwords.update({user: secrets.token_hex(32) for user in missing})
        _save(data_dir, {**stored, "passwords": passwords})
    return passwords


def record_server(data_dir: Path, address: str | None) -> None:
    """Remember where this data dir's nats-server listens (None: it stopped), for nats_url_for."""
    stored = _read(data_dir)
    if stored.get("server") != address:
        _save(data_dir, {**stored, "server": address})


def _save(data_dir: Path, content: dict) -> None:
    path = users_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, json.dumps(content, indent=2) + "\n")


def nats_url_for(data_dir: Path, user: str) -> str:
    """The URL of `user` on the embedded nats-server of the stack running on `data_dir`."""
    stored = _read(data_dir)
    if not stored.get("server"):
        raise RuntimeError(f"no embedded nats-server runs for {data_dir} (start one with `ccbridge up`)")
    if user not in stored.get("passwords", {}):
        raise KeyError(f"no NATS user {user!r} (users: {', '.join(USERS)})")
    return user_url(stored["server"], user, stored["passwords"][user])
