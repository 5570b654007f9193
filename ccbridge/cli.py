"""`ccbridge` — one command line for operators, developers and the demo.

Service verbs import their service lazily: the CLI wires processes, it holds no service logic.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help="ccbridge: Claude Code credentials for sandboxes.")
console = Console(stderr=True, soft_wrap=True, highlight=False)


def _data_dir() -> Path:
    return Path(os.environ.get("CCBRIDGE_DATA_DIR") or "./var")


def _run_service(name: str) -> None:
    importlib.import_module(f"services.{name}.app").main()


def _service_group(name: str, help_text: str) -> typer.Typer:
    """`ccbridge <name>` runs the service; `ccbridge <name> <verb>` runs one of its tools."""
    group = typer.Typer(help=help_text, invoke_without_command=True, no_args_is_help=False)

    @group.callback()
    def _run(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            _run_service(name)

    app.add_typer(group, name=name)
    return group


auth_app = _service_group("auth", "Run the auth service (HTTP API + connect page).")
vault_app = _service_group("vault", "Run the vault service, or one of its tools.")
sandbox_app = _service_group("sandbox", "Run the sandbox service, or one of its tools.")


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Keys, database, sandboxes, logs.")] = None,  # type: ignore[assignment]
) -> None:
    """Run the whole stack: embedded nats-server (unless NATS_URL is set) and the three services."""
    from ccbridge.nats_users import redact_url
    from ccbridge.stack import Stack

    stack = Stack(data_dir or _data_dir(), nats_url=os.environ.get("NATS_URL") or None)
    console.print("[bold]ccbridge[/bold]: starting nats, vault, sandbox, auth …")
    stack.start()
    # Never a password on screen: the embedded server's users and passwords are in a 0600 file.
    console.print(f"  NATS      {redact_url(stack.nats_url or '')}" + (
        f"  (embedded; one user per service as in production; passwords in {stack.nats_users_file})"
        if stack.nats else ""))
    console.print(f"  auth      {stack.auth_url}   (connect page: {stack.auth_url}/connect, API docs: /docs)")
    console.print(f"  data      {stack.data_dir}   (logs in {stack.log_dir})")
    console.print("  caller token for a user: [cyan]ccbridge token --user <id>[/cyan]    Ctrl-C stops everything.")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            stack.check_alive()
            time.sleep(0.5)
    finally:
        console.print("stopping …")
        stack.stop()


@app.command()
def token(
    user: Annotated[str, typer.Option("--user", help="User id (the JWT `sub`).")],
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint a caller token (HS256, AUTH_JWT_SECRET or the dev secret in CCBRIDGE_DATA_DIR)."""
    from ccbridge.demo import dev_jwt_secret, mint_caller_token

    secret = dev_jwt_secret(_data_dir() / "keys")
    if not secret:
        console.print("[red]no AUTH_JWT_SECRET and no dev secret yet: start the stack once (make run)[/red]")
        raise typer.Exit(2)
    typer.echo(mint_caller_token(secret, user, ttl))


@app.command()
def demo(
    user: Annotated[str, typer.Option(help="User id to connect.")] = "demo-user",
    keep: Annotated[bool, typer.Option(help="Keep the demo data dir.")] = False,
) -> None:
    """The whole flow against the bundled OAuth stand-in; exits 0 when the real CLI is logged in."""
    data_dir = Path(tempfile.mkdtemp(prefix="ccbridge-demo-"))
    try:
        ok = asyncio.run(_demo(user, data_dir))
    finally:
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    raise typer.Exit(0 if ok else 1)


async def _demo(user: str, data_dir: Path) -> bool:
    import secrets

    import httpx

    from ccbridge.client import CcbridgeClient, request_grant
    from ccbridge.demo import (
        claude_auth_status,
        connect_claude_account,
        find_claude,
        mint_caller_token,
        prepare_when_connected,
        standin_oauth_env,
    )
    from ccbridge.embedded_nats import free_port
    from ccbridge.nats_users import redact_url
    from ccbridge.stack import Stack
    from standins.oauth import OAuthStandin

    jwt_secret = secrets.token_urlsafe(32)
    async with OAuthStandin(port=0) as oauth:
        env = {
            "AUTH_JWT_SECRET": jwt_secret,
            **standin_oauth_env(oauth),
        }
        console.print(f"1. OAuth stand-in on {oauth.base_url}; starting the stack in {data_dir}")
        stack = Stack(data_dir, nats_url=os.environ.get("NATS_URL") or None, env=env, auth_port=free_port())
        async with stack:
            console.print(f"2. stack up: auth {stack.auth_url}, NATS {redact_url(stack.nats_url or '')}")
            async with httpx.AsyncClient(timeout=30) as http:
                connected = await connect_claude_account(http, stack.auth_url, mint_caller_token(jwt_secret, user))
            console.print(f"3. login + paste → HTTP {connected.status} {json.dumps(connected.body)}")
            if connected.status != 202:
                return False
            sandbox_id = f"demo-{uuid.uuid4().hex[:8]}"
            grant = await request_grant(stack.auth_url, mint_caller_token(jwt_secret, user), sandbox_id)
            console.print(f"4. {user} grants {sandbox_id}: mode {grant.mode}, lease until {grant.expires_at}")
            async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
                result = await prepare_when_connected(ccb, sandbox_id, user, timeout=30, grant=grant.token)
            console.print(f"5. sandbox.created → {type(result).__name__}: {result.model_dump_json()}")
            if result.__class__.__name__ != "SandboxCredentialsInjected":
                return False
            home = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / result.sandbox_id
            console.print(f"6. injected home {home}:")
            for path in sorted(home.rglob("*")):
                if path.is_file():
                    console.print(f"     {oct(path.stat().st_mode & 0o777)}  {path.relative_to(home)}")
            claude = find_claude()
            if not claude:
                console.print("7. the `claude` CLI is not installed here (make demo installs it); skipping its verdict")
                return True
            status = claude_auth_status(claude, home)
            console.print(f"7. HOME={home} claude auth status --json → {json.dumps(status)}")
            return bool(status.get("loggedIn"))


def _caller_token(token: str | None, user: str | None) -> str:
    from ccbridge.demo import dev_jwt_secret, mint_caller_token

    if token := token or os.environ.get("CCBRIDGE_TOKEN"):
        return token
    secret = dev_jwt_secret(_data_dir() / "keys")
    if user and secret:
        return mint_caller_token(secret, user)
    console.print("[red]give --token (or CCBRIDGE_TOKEN), or --user with a dev stack running (make run)[/red]")
    raise typer.Exit(2)


@app.command()
def login(
    auth_url: Annotated[str, typer.Option(envvar="CCBRIDGE_AUTH_URL", help="Auth service URL.")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(help="Caller token (JWT); or CCBRIDGE_TOKEN.")] = None,
    user: Annotated[str | None, typer.Option(help="Dev only: mint a caller token for this user.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
    no_browser: Annotated[bool, typer.Option(help="Only print the URL.")] = False,
) -> None:
    """Connect a Claude account from a terminal: open the URL, paste the code, done."""
    import sys

    import httpx

    from ccbridge.login import LoginError, browser_available, run_login

    caller = _caller_token(token, user)

    def read_paste() -> str:
        if sys.stdin.isatty():
            return typer.prompt("Code", hide_input=False)
        return sys.stdin.readline()

    with httpx.Client(timeout=30) as http:
        try:
            result = run_login(
                http,
                auth_url.rstrip("/"),
                caller,
                read_paste=read_paste,
                show=lambda line: console.print(line, soft_wrap=True, highlight=False),
                open_browser=not no_browser and browser_available(),
            )
        except LoginError as exc:
            if as_json:
                typer.echo(json.dumps({"ok": False, "error": exc.message, "status": exc.status, "problem": exc.problem}))
            else:
                console.print(f"[red]{exc.message}[/red]")
            raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(json.dumps({"ok": True, "status": result.status, "expires_at": result.expires_at, "scopes": result.scopes}))
    else:
        console.print(f"[green]Connected.[/green] Access valid until {result.expires_human()}; scopes: {' '.join(result.scopes)}")


@sandbox_app.command("create")
def sandbox_create(
    user: Annotated[str, typer.Option("--user", help="User whose credentials to inject.")],
    sandbox_id: Annotated[str, typer.Option("--sandbox-id", help="The platform's sandbox id.")],
    backend: Annotated[str, typer.Option(help="local | e2b")] = "local",
    mode: Annotated[str | None, typer.Option(help="file | access_only | env (default: the service's)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
    grant: Annotated[str | None, typer.Option(help="The person's grant for this sandbox; else asked of auth.")] = None,
    token: Annotated[str | None, typer.Option(help="The person's caller token (asks auth for the grant); "
                                                   "or CCBRIDGE_TOKEN; a dev stack mints one.")] = None,
    auth_url: Annotated[str, typer.Option(envvar="CCBRIDGE_AUTH_URL", help="Auth service URL.")] = "http://127.0.0.1:8000",
) -> None:
    """Get the person's grant for the sandbox (auth), publish sandbox.created and wait for the
    result. Exit 0 when the sandbox is ready, 1 when ccbridge refused (grant, connection), 3 when
    it could not be reached in time."""
    from ccbridge.client import CcbridgeClient, CcbridgeTimeout, GrantRefused, request_grant
    from shared.events import SandboxCredentialsInjected

    nats_url = _nats_url()
    caller = None if grant else _caller_token(token, user)

    async def _create():
        granted = grant or (await request_grant(auth_url, caller, sandbox_id, mode=mode)).token  # type: ignore[arg-type]
        async with CcbridgeClient(nats_url, inbox_prefix=_inbox_prefix("platform")) as ccb:
            return await ccb.prepare_sandbox(sandbox_id, user, backend=backend, mode=mode, timeout=timeout,  # type: ignore[arg-type]
                                             grant=granted)

    try:
        with console.status(f"preparing sandbox {sandbox_id} for {user} …", spinner="dots"):
            result = asyncio.run(_create())
    except GrantRefused as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": "grant_refused", "status": exc.status, "detail": exc.detail}))
        else:
            console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except CcbridgeTimeout as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": "timeout", "detail": str(exc)}))
        else:
            console.print(f"[red]{exc}[/red]")
        raise typer.Exit(3) from None
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback
        from ccbridge.nats_users import redact_url

        console.print(f"[red]cannot talk to ccbridge at {redact_url(nats_url)}: {type(exc).__name__}: {exc}[/red]")
        raise typer.Exit(3) from None
    ready = isinstance(result, SandboxCredentialsInjected)
    if as_json:
        typer.echo(json.dumps({"ok": ready, **result.model_dump(mode="json")}))
    elif ready:
        console.print(f"[green]ready[/green]: {sandbox_id} ({result.mode}, {result.backend}); files: {', '.join(result.files)}")
    else:
        console.print(f"[red]failed[/red]: {result.reason} — {result.detail}")
    raise typer.Exit(0 if ready else 1)


dlq_app = typer.Typer(help="Dead letters: list and replay.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def _nats_url() -> str:
    return os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"


def _inbox_prefix(user: str) -> str:
    """NATS_INBOX_PREFIX if set, else ccbridge's prefix of that NATS user (`_INBOX.ccbridge-<user>`):
    deploy/nats/accounts.conf lets each user read replies on its own prefix only."""
    from shared.subjects import inbox_prefix

    return os.environ.get("NATS_INBOX_PREFIX") or inbox_prefix(user)


async def _with_nats(work):
    """A connection for the operators' verbs (dlq …): NATS_URL is the `ops` user's."""
    import nats

    nc = await nats.connect(_nats_url(), connect_timeout=5, max_reconnect_attempts=1, inbox_prefix=_inbox_prefix("ops"))
    try:
        return await work(nc)
    finally:
        await nc.close()


@dlq_app.command("list")
def dlq_list(
    subject: Annotated[str | None, typer.Option(help="Only dead letters of this original subject.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    show_body: Annotated[bool, typer.Option(help="Include the (redacted) body.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List dead letters with the reason each was set aside."""
    from rich.table import Table

    from ccbridge.ops import list_dead_letters

    letters = asyncio.run(_with_nats(lambda nc: list_dead_letters(nc, subject=subject, limit=limit)))
    if as_json:
        typer.echo(json.dumps([letter.as_dict(with_body=show_body) for letter in letters]))
        return
    table = Table("seq", "original subject", "reason", "time", "bytes", title=f"{len(letters)} dead letter(s)")
    for letter in letters:
        row = letter.as_dict(with_body=show_body)
        table.add_row(str(row["seq"]), row["original_subject"], row["reason"], row["time"] or "", str(row["size"]))
    Console().print(table)
    if show_body:
        for letter in letters:
            Console().print(f"[bold]{letter.seq}[/bold] {letter.as_dict(with_body=True)['body']}")


@dlq_app.command("replay")
def dlq_replay(
    seq: Annotated[list[int], typer.Argument(help="Sequence number(s) from `ccbridge dlq list`.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Publish dead letters back on their original subject (after fixing the cause)."""
    from ccbridge.ops import replay_dead_letter

    async def _replay(nc):
        return [(n, await replay_dead_letter(nc, n)) for n in seq]

    try:
        done = asyncio.run(_with_nats(_replay))
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback
        console.print(f"[red]replay failed: {type(exc).__name__}: {exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps([{"seq": n, "subject": subject} for n, subject in done]))
    else:
        for n, subject in done:
            console.print(f"replayed {n} → {subject}")


# --- vault tools (issue 5): `ccbridge vault migrate|revoke`, `ccbridge keys ...` ------------
# Thin: parse, call services.vault.tools, print. Settings come from the vault's env
# (DATABASE_URL, VAULT_DATABASE_SCHEMA, VAULT_KEKS / VAULT_KEK_FILE, CCBRIDGE_DATA_DIR, NATS_URL).
keys_app = typer.Typer(help="The vault's key-encryption keys: rotate, rewrap, retire, list.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _vault_tool(run):
    """Run one async vault tool with the vault's settings; typed vault errors → exit 2.
    Logs go to stderr (redacted), so stdout stays machine-readable."""
    import structlog

    from services.vault.errors import VaultError
    from services.vault.settings import VaultSettings
    from shared.logging import configure_logging

    settings = VaultSettings()
    if not structlog.is_configured():
        configure_logging(settings.log_level, settings.log_format, service="vault-cli")
    try:
        return asyncio.run(run(settings))
    except VaultError as exc:
        console.print(f"[red]{exc.reason}: {exc.detail}[/red]")
        raise typer.Exit(2) from None


@vault_app.command("migrate")
def vault_migrate(
    revision: Annotated[str, typer.Option(help="Target Alembic revision.")] = "head",
) -> None:
    """Bring the vault's database schema up to date (the vault also does this at start)."""
    from services.vault import tools

    report = _vault_tool(lambda s: tools.migrate(s, revision))
    console.print(f"vault schema: {report.before or 'empty'} → {report.after} (head {report.head})")


@vault_app.command("revoke")
def vault_revoke(
    user: Annotated[str, typer.Option("--user", help="User whose connection to revoke.")],
    reason: Annotated[str, typer.Option(help="Recorded in the event and the audit log.")] = "operator_request",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the vault to confirm (0: don't).")] = 0.0,
) -> None:
    """Publish tokens.revoked: the vault crypto-shreds the tokens, sandboxes are scrubbed."""
    from services.vault import tools

    event, confirmed = _vault_tool(lambda s: tools.revoke_user(s, user, reason=reason, wait_s=wait))
    console.print(f"tokens.revoked published for {user} (event {event.event_id})")
    if confirmed is False:
        console.print("[red]the vault did not confirm in time[/red]")
        raise typer.Exit(1)
    if confirmed:
        console.print("[green]the vault shredded the connection[/green]")


@keys_app.command("rotate")
def keys_rotate(
    rewrap: Annotated[bool, typer.Option(help="Re-wrap every record under the new key now.")] = True,
    retire_old: Annotated[bool, typer.Option(help="Then retire KEKs no record uses any more.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Add a new key-encryption key (it becomes active) and re-wrap every record, online."""
    from services.vault import tools

    report = _vault_tool(lambda s: tools.rotate_keys(s, rewrap=rewrap, retire_previous=retire_old))
    summary = {
        "new_kek_id": report.new_kek_id,
        "previous_kek_id": report.previous_kek_id,
        "moved": report.rewrap.moved if report.rewrap else None,
        "failures": report.rewrap.failures if report.rewrap else {},
        "records_by_kek": report.rewrap.by_kek if report.rewrap else None,
        "retired": report.retired,
    }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        console.print(f"active KEK {report.new_kek_id} (was {report.previous_kek_id}); "
                      f"re-wrapped {summary['moved']}; records by KEK {summary['records_by_kek']}; "
                      f"retired {report.retired or 'none'}")
        for user_id, why in summary["failures"].items():
            console.print(f"[red]  not re-wrapped: {user_id} ({why})[/red]")
    raise typer.Exit(1 if summary["failures"] else 0)


@keys_app.command("rewrap")
def keys_rewrap() -> None:
    """Re-wrap every record under the active KEK of the configured source."""
    from services.vault import tools

    report = _vault_tool(lambda s: tools.rewrap(s))
    console.print(f"re-wrapped {report.moved} under {report.active_kek_id}; records by KEK {report.by_kek}")
    for user_id, why in report.failures.items():
        console.print(f"[red]  not re-wrapped: {user_id} ({why})[/red]")
    raise typer.Exit(1 if report.failures else 0)


@keys_app.command("retire")
def keys_retire(
    kek_id: Annotated[str, typer.Argument(help="The KEK id to retire.")],
    force: Annotated[bool, typer.Option(help="Even if records still use it (they will fail loudly).")] = False,
) -> None:
    """Destroy a KEK's bytes (its id is kept, so records still under it fail loudly)."""
    from services.vault import tools

    in_use = _vault_tool(lambda s: tools.retire_key(s, kek_id, force=force))
    console.print(f"retired {kek_id}" + (f" ([red]{in_use} records now unreadable[/red])" if in_use else ""))


@keys_app.command("list")
def keys_list() -> None:
    """KEK ids (never key bytes): active, others, retired, and records per KEK."""
    from services.vault import tools

    typer.echo(json.dumps(_vault_tool(tools.key_status), indent=2))


connections_app = typer.Typer(help="Connections the vault holds (never a secret).", no_args_is_help=True)
app.add_typer(connections_app, name="connections")


@connections_app.command("list")
def connections_list(
    state: Annotated[str | None, typer.Option(help="connected | refresh_failed | reconnect_required")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Who is connected, in which state, until when — ids, scopes and expiries only."""
    from datetime import UTC, datetime

    from rich.table import Table

    from services.vault.tools import list_connections

    rows = _vault_tool(lambda settings: list_connections(settings, state=state, limit=limit))
    if as_json:
        typer.echo(json.dumps(rows))
        return

    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC") if ms else "—"

    table = Table("user", "kind", "state", "access until", "login until", "version", "key", title=f"{len(rows)} connection(s)")
    for row in rows:
        table.add_row(row["user_id"], row["kind"], row["state"], when(row["expires_at"]),
                      when(row["refresh_token_expires_at"]), str(row["version"]), row["kek_id"] or "—")
    Console().print(table)


@app.command("standin-oauth")
def standin_oauth(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8900,
) -> None:
    """Run the bundled OAuth stand-in (for trying the flow by hand)."""
    from standins.oauth import run_oauth_standin

    run_oauth_standin("127.0.0.1", port)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
