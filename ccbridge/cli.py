"""`ccbridge` — one command line for operators, developers and the demo.

Service verbs import their service lazily: the CLI wires processes, it holds no service logic.

Exit codes (every verb; docs/operations.md "Command line"):
  0  done
  1  refused: ccbridge answered no (grant refused, credentials not injected, nothing to replay, …)
  2  usage: bad input, or nothing to work on here (no keys, no database, no caller token)
  3  unreachable: NATS, auth or the database did not answer, or no answer within the timeout

Where things are (same rules as `ccbridge up`): the data dir is CCBRIDGE_DATA_DIR, else ./var;
NATS is NATS_URL, else the running stack's (`<data dir>/stack.json`), else nats://127.0.0.1:4222;
auth is --auth-url / CCBRIDGE_AUTH_URL, else the running stack's, else http://127.0.0.1:8000.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CODES_HELP = ("Exit codes: 0 done, 1 refused by ccbridge, 2 usage (bad input, nothing set up here), "
                   "3 unreachable or timed out.")

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help=f"ccbridge: Claude Code credentials for sandboxes.\n\n{EXIT_CODES_HELP}",
)
console = Console(stderr=True, soft_wrap=True, highlight=False)

Backend = Literal["local", "e2b"]
CredentialMode = Literal["file", "access_only", "env"]
ConnectionState = Literal["connected", "refresh_failed", "reconnect_required"]


def flag(*decls: str, help: str) -> Any:  # noqa: A002 - typer's name
    """A plain on/off switch (`--json`): one declaration, so no `--no-…` twin in the help."""
    return typer.Option(*decls, help=help, show_default=False)


def _flags_show_no_type() -> None:
    """Typer 0.29's rich help prints a `<bool>` type after every flag, `--help` included; a flag
    takes no value, so its type column stays empty (presentation only)."""
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_ccbridge", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        if self.is_flag and not self.count:
            return None
        return original(self, ctx)

    display_type_rich._ccbridge = True  # type: ignore[attr-defined]  # marks the patch as applied
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]  # the patch (see above)


_flags_show_no_type()


def standins_oauth() -> Any:
    """The OAuth stand-in module, or a usage error: the stand-ins are a development tool
    (standins/, installed by `make install`), not part of the ccbridge wheel or image."""
    try:
        from standins import oauth
    except ImportError:
        fail("the OAuth stand-in is a development tool, not installed here: run from a source checkout "
             "(make install)", EXIT_USAGE)
    return oauth


def fail(message: str, code: int, *, as_json: bool = False, error: str = "error", **extra: Any) -> NoReturn:
    """One line on stderr (or one JSON object on stdout with --json), then exit `code`."""
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": error, "detail": message, **extra}))
    else:
        console.print(f"[red]{escape(message)}[/red]")
    raise typer.Exit(code)


def _data_dir() -> Path:
    from ccbridge import stackfile

    return stackfile.data_dir()


def _run_service(name: str) -> None:
    import importlib

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


# --- ccbridge up / stack --------------------------------------------------------------------
@app.command()
def up(
    data_dir: Annotated[Path | None, typer.Option(
        help="Keys, database, sandboxes, logs (default: CCBRIDGE_DATA_DIR, else ./var).")] = None,
    standin_oauth: Annotated[bool, flag("--standin-oauth", help="Also run the bundled OAuth stand-in and point "
                                        "auth and the vault at it (trying the flow by hand; NOT for real accounts).")] = False,
    standin_port: Annotated[int, typer.Option(help="The stand-in's port on 127.0.0.1 (0: a free one).", min=0, max=65535)] = 0,
) -> None:
    """Run the whole stack: embedded nats-server (unless NATS_URL is set) and the three services.

    Writes <data dir>/stack.json (0600) while it runs, so other ccbridge verbs find it; its
    services and nats-server stop with it, even when it is killed."""
    from ccbridge import stackfile
    from ccbridge.stack import Stack

    directory = (data_dir or _data_dir()).resolve()
    running = stackfile.read_live(directory)
    if running and running.get("pid") != os.getpid():
        pid = running["pid"]
        fail(f"a stack already runs on {directory} (pid {pid}): stop it first (Ctrl-C there, or kill {pid})", EXIT_USAGE)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Before anything starts: a signal during the start stops cleanly after it, never half-way.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    env: dict[str, str] = {}
    standin = None
    if standin_oauth:
        from ccbridge.demo import BackgroundStandin, standin_oauth_env

        standin = BackgroundStandin(standins_oauth(), port=standin_port).start()
        env.update(standin_oauth_env(standin.server))
    stack = Stack(directory, nats_url=os.environ.get("NATS_URL") or None, env=env)
    console.print("[bold]ccbridge[/bold]: starting nats-server, vault, sandbox, auth …")
    try:
        stack.start()
    except Exception as exc:  # noqa: BLE001 - one clear line; the logs have the rest
        if standin:
            standin.stop()
        fail(f"the stack did not start: {exc}".splitlines()[0] + f" (logs in {stack.log_dir})", EXIT_REFUSED)
    info = stack.describe()
    if standin:
        info["standin_oauth_url"] = standin.server.base_url
    file = stackfile.write(directory, info)
    _banner(stack, info, file)
    try:
        while not stopping:
            stack.check_alive()
            time.sleep(0.5)
    finally:
        console.print("stopping …")
        stackfile.remove(directory, pid=os.getpid())
        stack.stop()
        if standin:
            standin.stop()


def _banner(stack: Any, info: dict[str, Any], file: Path) -> None:
    """Everything a newcomer needs to find, never a password (NATS URLs are redacted)."""
    from shared.settings import redact_url

    metrics = "  ".join(f"{name} http://127.0.0.1:{info[f'{name}_metrics_port']}/metrics" for name in ("vault", "sandbox"))
    lines = [
        f"[bold green]ccbridge is up[/bold green] (pid {info['pid']})",
        f"  auth      {info['auth_url']}   (connect page {info['auth_url']}/connect, API docs {info['auth_url']}/docs)",
        f"  NATS      {redact_url(info['nats_url'])}"
        + (f"   (embedded; one user per service as in production; passwords in {stack.nats_users_file})"
           if info["nats_embedded"] else "   (NATS_URL)"),
        f"  metrics   {metrics}   (also /healthz, /readyz)",
        f"  data      {info['data_dir']}   (database {redact_url(info['database_url'])}, sandboxes {info['local_sandbox_root']})",
        f"  logs      {info['logs']}",
        f"  stack     {file} (0600): ccbridge verbs and CcbridgeClient() find this stack through it",
    ]
    if url := info.get("standin_oauth_url"):
        lines.append(f"  [bold yellow]OAuth     STAND-IN at {url}: a fake Claude login server. NOT for real accounts:"
                     " no real Claude credentials are issued or accepted.[/bold yellow]")
    if Path(info["data_dir"]) != _data_dir().resolve():  # `up --data-dir X`: the other verbs look in CCBRIDGE_DATA_DIR
        lines.append(f"  [bold]other ccbridge verbs: export CCBRIDGE_DATA_DIR={info['data_dir']}[/bold]")
    lines.append("  next      ccbridge token --user alice   ·   ccbridge login --user alice   ·   "
                 "ccbridge sandbox create --user alice --sandbox-id sbx-1")
    lines.append("  Ctrl-C stops everything.")
    for line in lines:
        console.print(line)


@app.command("stack")
def stack_info(
    get: Annotated[str | None, typer.Option("--get", help="Print only this field (e.g. auth_url).")] = None,
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
) -> None:
    """The stack `ccbridge up` runs on this data dir (its stack.json), NATS passwords redacted."""
    from ccbridge import stackfile
    from shared.settings import redact_url

    doc = stackfile.read_live()
    if doc is None:
        fail(f"no running `ccbridge up` on {_data_dir()} (no live {stackfile.path()}): start one, "
             "or set CCBRIDGE_DATA_DIR", EXIT_UNREACHABLE, as_json=as_json, error="no_stack")
    shown = {key: (redact_url(value) if key in ("nats_url", "database_url") else value) for key, value in doc.items()}
    shown["nats_urls"] = {user: redact_url(url) for user, url in (doc.get("nats_urls") or {}).items()}
    if get is not None:
        if get not in shown:
            fail(f"no field {get!r} in stack.json (fields: {', '.join(sorted(shown))})", EXIT_USAGE)
        value = shown[get]
        typer.echo(json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    elif as_json:
        typer.echo(json.dumps(shown))
    else:
        for key, value in shown.items():
            typer.echo(f"{key:22} {json.dumps(value) if isinstance(value, (dict, list)) else value}")


# --- tokens, demo, login --------------------------------------------------------------------
@app.command()
def token(
    user: Annotated[str, typer.Option("--user", help="User id (the JWT `sub`).")],
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.", min=1)] = 3600,
) -> None:
    """Mint a caller token (HS256, AUTH_JWT_SECRET or the dev secret in CCBRIDGE_DATA_DIR)."""
    from ccbridge.demo import dev_jwt_secret, mint_caller_token

    _check_user_id(user)
    secret = dev_jwt_secret(_data_dir() / "keys")
    if not secret:
        fail(f"no AUTH_JWT_SECRET and no dev secret in {_data_dir() / 'keys'} yet: start the stack once (make run)",
             EXIT_USAGE)
    typer.echo(mint_caller_token(secret, user, ttl))


@app.command()
def demo(
    user: Annotated[str, typer.Option(help="User id to connect.")] = "demo-user",
    keep: Annotated[bool, flag("--keep", help="Keep the demo data dir.")] = False,
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
    from ccbridge.stack import Stack
    from shared.settings import redact_url
    OAuthStandin = standins_oauth().OAuthStandin  # noqa: N806 - a class, named as one

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


def _caller_token(token: str | None, user: str | None, *, as_json: bool = False) -> str:
    from ccbridge.demo import dev_jwt_secret, mint_caller_token

    if token := token or os.environ.get("CCBRIDGE_TOKEN"):
        return token
    secret = dev_jwt_secret(_data_dir() / "keys")
    if user and secret:
        return mint_caller_token(secret, user)
    fail(f"give --token (or CCBRIDGE_TOKEN), or --user with a dev stack's secret in {_data_dir() / 'keys'} "
         "(make run) or AUTH_JWT_SECRET", EXIT_USAGE, as_json=as_json, error="no_caller_token")


def _auth_url(option: str | None) -> tuple[str, str]:
    """(URL, where it came from) — --auth-url, else CCBRIDGE_AUTH_URL, else the running stack's."""
    from ccbridge import stackfile

    if option:
        return option.rstrip("/"), "--auth-url"
    resolved = stackfile.auth_url()
    return resolved.value, resolved.hint()


AUTH_URL_HELP = "Auth service URL (default: CCBRIDGE_AUTH_URL, else the running `ccbridge up`'s, else http://127.0.0.1:8000)."


@app.command()
def login(
    auth_url: Annotated[str | None, typer.Option(help=AUTH_URL_HELP, show_default=False)] = None,
    token: Annotated[str | None, typer.Option(help="Caller token (JWT); or CCBRIDGE_TOKEN.")] = None,
    user: Annotated[str | None, typer.Option(help="Dev only: mint a caller token for this user.")] = None,
    as_json: Annotated[bool, flag("--json", help="Machine-readable result on stdout.")] = False,
    no_browser: Annotated[bool, flag("--no-browser", help="Only print the URL, do not open a browser.")] = False,
) -> None:
    """Connect a Claude account from a terminal: open the URL, paste the code, done."""
    import httpx

    from ccbridge.login import LoginError, browser_available, login_expiry, run_login

    if user is not None:
        _check_user_id(user)
    caller = _caller_token(token, user, as_json=as_json)
    url, _source = _auth_url(auth_url)

    def read_paste() -> str:
        if sys.stdin.isatty():
            return typer.prompt("Code", hide_input=False)
        return sys.stdin.readline()

    with httpx.Client(timeout=30) as http:
        try:
            result = run_login(
                http,
                url,
                caller,
                read_paste=read_paste,
                show=lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False),
                open_browser=not no_browser and browser_available(),
            )
        except LoginError as exc:
            if as_json:
                typer.echo(json.dumps({"ok": False, "error": exc.message, "status": exc.status, "problem": exc.problem}))
            else:
                console.print(f"[red]{escape(exc.message)}[/red]")
            raise typer.Exit(exc.exit_code) from None
        result.login_expires_at = login_expiry(http, url, caller)
    if as_json:
        typer.echo(json.dumps({"ok": True, "status": result.status, "expires_at": result.expires_at,
                               "access_token_expires_at": result.expires_at,
                               "login_expires_at": result.login_expires_at, "scopes": result.scopes}))
    else:
        console.print(f"[green]Connected.[/green] {escape(result.summary())}; scopes: {' '.join(result.scopes)}")


# --- input checks (before anything connects) ----------------------------------------------
def _check(value: str, annotation: Any, option: str, what: str, *, as_json: bool = False) -> None:
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        fail(f"{option} {value!r} is not {what}", EXIT_USAGE, as_json=as_json, error="usage")


def _check_user_id(user: str, *, as_json: bool = False) -> None:
    from shared.events import UserId

    _check(user, UserId, "--user", "a user id (1-256 printable characters)", as_json=as_json)


def _check_sandbox_id(sandbox_id: str, *, as_json: bool = False) -> None:
    from shared.events import SandboxId

    _check(sandbox_id, SandboxId, "--sandbox-id",
           "a sandbox id (letters, digits, '-' and '_', dot-separated parts, at most 128 characters)", as_json=as_json)


# --- sandbox create -------------------------------------------------------------------------
def _nats_url(user: str) -> tuple[str, str]:
    """(URL, where it came from) of NATS user `user`: NATS_URL, else the running stack's user."""
    from ccbridge import stackfile

    resolved = stackfile.nats_url(user)
    return resolved.value, resolved.hint()


def _inbox_prefix(user: str) -> str:
    """NATS_INBOX_PREFIX if set, else ccbridge's prefix of that NATS user (`_INBOX.ccbridge-<user>`):
    deploy/nats/accounts.conf lets each user read replies on its own prefix only."""
    from shared.subjects import inbox_prefix

    return os.environ.get("NATS_INBOX_PREFIX") or inbox_prefix(user)


UNREACHABLE_HINT = "is the stack running? (`ccbridge up`), or set NATS_URL"


@sandbox_app.command("create")
def sandbox_create(
    user: Annotated[str, typer.Option("--user", help="User whose credentials to inject.")],
    sandbox_id: Annotated[str, typer.Option("--sandbox-id", help="The platform's sandbox id.")],
    backend: Annotated[Backend, typer.Option(help="Where the sandbox runs.")] = "local",
    mode: Annotated[CredentialMode | None, typer.Option(help="Credential mode (default: the service's, access_only).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole call: grant, connect, result.", min=0.1)] = 30.0,
    as_json: Annotated[bool, flag("--json", help="Machine-readable result on stdout.")] = False,
    grant: Annotated[str | None, typer.Option(help="The person's grant for this sandbox; else asked of auth.")] = None,
    token: Annotated[str | None, typer.Option(help="The person's caller token (asks auth for the grant); "
                                                   "or CCBRIDGE_TOKEN; a dev stack mints one.")] = None,
    auth_url: Annotated[str | None, typer.Option(help=AUTH_URL_HELP, show_default=False)] = None,
) -> None:
    """Inject a person's credentials into a sandbox: grant (auth), sandbox.created, wait for the result.

    Exit 0 when the sandbox is ready, 1 when ccbridge refused (grant, connection), 2 on bad input,
    3 when auth or NATS could not be reached or nothing answered within --timeout."""
    import httpx

    from ccbridge.client import CcbridgeClient, CcbridgeTimeout, CcbridgeUnavailable, GrantRefused, request_grant
    from shared.events import SandboxCredentialsInjected
    from shared.settings import redact_url

    _check_user_id(user, as_json=as_json)
    _check_sandbox_id(sandbox_id, as_json=as_json)
    nats_url, nats_source = _nats_url("platform")
    caller = "" if grant else _caller_token(token, user, as_json=as_json)  # with a grant, no caller token is needed
    granted_url, auth_source = _auth_url(auth_url)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    async def _create():
        granted = grant or (await request_grant(granted_url, caller, sandbox_id, mode=mode,
                                                timeout=left())).token
        async with CcbridgeClient(nats_url, inbox_prefix=_inbox_prefix("platform"), connect_timeout=left()) as ccb:
            return await ccb.prepare_sandbox(sandbox_id, user, backend=backend, mode=mode, timeout=left(), grant=granted)

    try:
        with console.status(f"preparing sandbox {sandbox_id} for {user} …", spinner="dots"):
            result = asyncio.run(_create())
    except GrantRefused as exc:
        fail(str(exc), EXIT_REFUSED, as_json=as_json, error="grant_refused", status=exc.status)
    except httpx.HTTPError as exc:
        fail(f"cannot reach auth at {granted_url} ({auth_source}): {type(exc).__name__} — is the stack running? "
             "(`ccbridge up`), or give --auth-url / CCBRIDGE_AUTH_URL", EXIT_UNREACHABLE, as_json=as_json,
             error="auth_unreachable")
    except CcbridgeUnavailable as exc:
        fail(f"{exc} ({nats_source}) — {UNREACHABLE_HINT}", EXIT_UNREACHABLE, as_json=as_json, error="unreachable")
    except CcbridgeTimeout as exc:
        fail(str(exc), EXIT_UNREACHABLE, as_json=as_json, error="timeout")
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback
        fail(f"talking to ccbridge at {redact_url(nats_url)} failed: {type(exc).__name__}: {exc}", EXIT_UNREACHABLE,
             as_json=as_json, error="unreachable")
    ready = isinstance(result, SandboxCredentialsInjected)
    if as_json:
        typer.echo(json.dumps({"ok": ready, **result.model_dump(mode="json")}))
    elif ready:
        console.print(f"[green]ready[/green]: {sandbox_id} ({result.mode}, {result.backend}); files: {', '.join(result.files)}")
    else:
        console.print(f"[red]failed[/red]: {result.reason} — {escape(result.detail)}")
    raise typer.Exit(0 if ready else EXIT_REFUSED)


# --- dead letters ---------------------------------------------------------------------------
dlq_app = typer.Typer(help="Dead letters: list and replay.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

TimeoutOption = Annotated[float, typer.Option(help="Seconds to reach NATS and get answers.", min=0.1)]


def _with_ops_nats(work, *, timeout: float, as_json: bool):
    """Run `work(nc)` on a connection as the `ops` user (operators' verbs), bounded by `timeout`."""
    from shared import nats_connect

    url, source = _nats_url("ops")

    async def run():
        nc = await nats_connect.connect(url, timeout=timeout, name="ccbridge-cli", inbox_prefix=_inbox_prefix("ops"))
        try:
            return await asyncio.wait_for(work(nc), timeout)
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except nats_connect.BusUnreachable as exc:
        fail(f"{exc} ({source}) — {UNREACHABLE_HINT} (the ops user's URL)", EXIT_UNREACHABLE, as_json=as_json,
             error="unreachable")
    except TimeoutError:
        fail(f"NATS did not answer within {timeout:g} s", EXIT_UNREACHABLE, as_json=as_json, error="timeout")


@dlq_app.command("list")
def dlq_list(
    subject: Annotated[str | None, typer.Option(help="Only dead letters of this original subject.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    show_body: Annotated[bool, flag("--show-body", help="Include the (redacted) body.")] = False,
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List dead letters with the reason each was set aside."""
    from rich.table import Table

    from ccbridge.ops import list_dead_letters

    letters = _with_ops_nats(lambda nc: list_dead_letters(nc, subject=subject, limit=limit), timeout=timeout,
                             as_json=as_json)
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
            Console().print(f"[bold]{letter.seq}[/bold] {escape(letter.as_dict(with_body=True)['body'])}")


@dlq_app.command("replay")
def dlq_replay(
    seq: Annotated[list[int], typer.Argument(help="Sequence number(s) from `ccbridge dlq list`.")],
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Publish dead letters back on their original subject (after fixing the cause).

    Each letter leaves the dead-letter stream only once its new copy is stored; if the replay
    fails again, a new dead letter says so."""
    from nats.js.errors import NotFoundError

    from ccbridge.ops import replay_dead_letter

    async def _replay(nc: Any) -> list[tuple[int, str | None, str | None]]:
        done: list[tuple[int, str | None, str | None]] = []
        for n in seq:
            try:
                done.append((n, await replay_dead_letter(nc, n), None))
            except NotFoundError:
                done.append((n, None, "no dead letter with this sequence number"))
            except ValueError as exc:
                done.append((n, None, str(exc)))
        return done

    done = _with_ops_nats(_replay, timeout=timeout, as_json=as_json)
    failed = [item for item in done if item[2]]
    if as_json:
        typer.echo(json.dumps([{"seq": n, "subject": subject, **({"error": why} if why else {})}
                               for n, subject, why in done]))
    else:
        for n, subject, why in done:
            console.print(f"replayed {n} → {subject}" if not why else f"[red]{n}: {escape(why)}[/red]")
    raise typer.Exit(EXIT_REFUSED if failed else 0)


# --- vault tools: `ccbridge vault migrate|revoke`, `ccbridge keys ...`, `ccbridge connections list`
# Thin: parse, check what is there, call services.vault.tools, print. Settings come from the vault's
# env (DATABASE_URL, VAULT_DATABASE_SCHEMA, VAULT_KEKS / VAULT_KEK_FILE, CCBRIDGE_DATA_DIR, NATS_URL),
# resolved like `ccbridge up` resolves them: the data dir is CCBRIDGE_DATA_DIR, else ./var; the
# database DATABASE_URL, else the running stack's, else <data dir>/vault.db; NATS the ops user's.
keys_app = typer.Typer(help="The vault's key-encryption keys: init, rotate, rewrap, retire, list.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _vault_settings():
    from ccbridge import stackfile
    from services.vault.settings import VaultSettings

    overrides: dict[str, Any] = {"data_dir": _data_dir()}
    if not os.environ.get("DATABASE_URL", "").strip():
        overrides["database_url"] = stackfile.database_url().value
    if not os.environ.get("NATS_URL", "").strip():
        overrides["nats_url"] = stackfile.nats_url("ops").value
    return VaultSettings(**overrides)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None: not SQLite, or in memory)."""
    match = re.match(r"^sqlite(?:\+\w+)?:///(.+?)(?:\?.*)?$", url)
    if not match or match.group(1) in (":memory:", ""):
        return None
    return Path(match.group(1))


def _vault_tool(run, *, needs_keys: bool = True, needs_database: bool = True, as_json: bool = False):
    """Run one async vault tool with the vault's settings. Checks first that what it works on is
    there (never creates a key file or an empty database by accident): missing → exit 2; the
    database or NATS unreachable → exit 3; other typed vault errors → exit 2.
    Logs go to stderr (redacted), so stdout stays machine-readable."""
    from pydantic import ValidationError

    from services.vault.errors import StoreUnavailable, VaultError
    from shared import nats_connect
    from shared.logging import configure_logging
    from shared.settings import redact_url

    try:
        settings = _vault_settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        fail(f"invalid settings: {problems}", EXIT_USAGE, as_json=as_json, error="usage")
    if needs_keys and settings.keks is None and not settings.kek_path.exists():
        fail(f"no vault keys at {settings.kek_path}: run `ccbridge up` once or `ccbridge keys init` here, "
             "or point CCBRIDGE_DATA_DIR (or VAULT_KEKS / VAULT_KEK_FILE) at the vault's", EXIT_USAGE,
             as_json=as_json, error="no_keys")
    database_url = settings.database_url.get_secret_value()
    sqlite_file = _sqlite_file(database_url)
    if needs_database and sqlite_file is not None and not sqlite_file.exists():
        fail(f"no vault database at {sqlite_file}: run `ccbridge up` (or `ccbridge vault migrate`) first, "
             "or point CCBRIDGE_DATA_DIR / DATABASE_URL at the vault's", EXIT_USAGE, as_json=as_json,
             error="no_database")
    # Always: structlog may be "configured" with its defaults (print to stdout) by whoever ran
    # before in this process; the CLI's logs belong on stderr, stdout is for results.
    configure_logging(settings.log_level, settings.log_format, service="vault-cli")
    try:
        return asyncio.run(run(settings))
    except nats_connect.BusUnreachable as exc:
        fail(f"{exc} — {UNREACHABLE_HINT} (the ops user's URL)", EXIT_UNREACHABLE, as_json=as_json, error="unreachable")
    except StoreUnavailable as exc:
        fail(f"cannot reach the vault database at {redact_url(database_url)}: {exc.detail}", EXIT_UNREACHABLE,
             as_json=as_json, error="database_unreachable")
    except VaultError as exc:
        fail(f"{exc.reason}: {exc.detail}", EXIT_USAGE, as_json=as_json, error=exc.reason)
    except (OSError, TimeoutError) as exc:
        fail(f"cannot reach the vault database at {redact_url(database_url)}: {type(exc).__name__}: {exc}",
             EXIT_UNREACHABLE, as_json=as_json, error="database_unreachable")
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlalchemy", "asyncpg", "sqlite3")):
            fail(f"the vault database at {redact_url(database_url)} failed: {type(exc).__name__}", EXIT_UNREACHABLE,
                 as_json=as_json, error="database_unreachable")
        raise


@vault_app.command("migrate")
def vault_migrate(
    revision: Annotated[str, typer.Option(help="Target Alembic revision.")] = "head",
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
) -> None:
    """Bring the vault's database schema up to date (the vault also does this at start).

    Creates the database when it does not exist yet."""
    from services.vault import tools

    report = _vault_tool(lambda s: tools.migrate(s, revision), needs_keys=False, needs_database=False, as_json=as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, "before": report.before, "after": report.after, "head": report.head}))
    else:
        console.print(f"vault schema: {report.before or 'empty'} → {report.after} (head {report.head})")


@vault_app.command("revoke")
def vault_revoke(
    user: Annotated[str, typer.Option("--user", help="User whose connection to revoke.")],
    reason: Annotated[str, typer.Option(help="Recorded in the event and the audit log.")] = "operator_request",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the vault to say what it did (0: don't).", min=0)] = 0.0,
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Publish tokens.revoked: the vault crypto-shreds the person's tokens, sandboxes are scrubbed.

    With --wait, say whether there was a connection to shred."""
    from services.vault import tools

    _check_user_id(user, as_json=as_json)
    report = _vault_tool(lambda s: tools.revoke_user(s, user, reason=reason, wait_s=wait, connect_timeout=timeout),
                         needs_keys=False, needs_database=wait > 0, as_json=as_json)
    outcome = report.outcome
    if as_json:
        typer.echo(json.dumps({"ok": outcome != "timeout", "event_id": report.event.event_id, "user_id": user,
                               "outcome": outcome}))
    else:
        console.print(f"tokens.revoked published for {escape(user)} (event {report.event.event_id})")
        if outcome == "revoked":
            console.print("[green]the vault shredded the connection[/green]; live sandboxes are being scrubbed")
        elif outcome == "not_connected":
            console.print(f"nothing was connected for {escape(user)}: there was nothing to shred")
        elif outcome == "timeout":
            console.print(f"[red]the vault did not confirm within {wait:g} s[/red]")
        elif outcome is None:
            console.print("the vault shreds the connection if there is one (--wait N shows what it did)")
        else:
            console.print(f"the vault reports: {escape(outcome)}")
    if outcome == "timeout":
        raise typer.Exit(EXIT_UNREACHABLE)


@keys_app.command("init")
def keys_init(
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
) -> None:
    """Create the keys `ccbridge up` creates on its first start, where missing (0600).

    In <data dir>/keys: the vault's KEK file, the vault's and the sandbox service's HPKE keys,
    auth's grant key. Never replaces one. Other key verbs never create keys."""
    from services.vault import tools

    async def init(settings):
        return tools.init_keys(settings)

    made = _vault_tool(init, needs_keys=False, needs_database=False, as_json=as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, "keys": [{"name": k.name, "path": k.path, "created": k.created} for k in made]}))
        return
    for key in made:
        where = key.path or "VAULT_KEKS (environment)"
        console.print(f"{'created' if key.created else 'kept   '}  {key.name:16} {where}")


@keys_app.command("rotate")
def keys_rotate(
    rewrap: Annotated[bool, typer.Option("--rewrap/--no-rewrap", help="Re-wrap every record under the new key now.")] = True,
    retire_old: Annotated[bool, flag("--retire-old", help="Then retire KEKs no record uses any more.")] = False,
    as_json: Annotated[bool, flag("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Add a new key-encryption key (it becomes active) and re-wrap every record, online."""
    from services.vault import tools

    report = _vault_tool(lambda s: tools.rotate_keys(s, rewrap=rewrap, retire_previous=retire_old), as_json=as_json)
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
            console.print(f"[red]  not re-wrapped: {escape(user_id)} ({why})[/red]")
    raise typer.Exit(EXIT_REFUSED if summary["failures"] else 0)


@keys_app.command("rewrap")
def keys_rewrap(
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
) -> None:
    """Re-wrap every record under the active KEK of the configured source."""
    from services.vault import tools

    report = _vault_tool(lambda s: tools.rewrap(s), as_json=as_json)
    if as_json:
        typer.echo(json.dumps({"ok": report.ok, "active_kek_id": report.active_kek_id, "moved": report.moved,
                               "records_by_kek": report.by_kek, "failures": report.failures}))
    else:
        console.print(f"re-wrapped {report.moved} under {report.active_kek_id}; records by KEK {report.by_kek}")
        for user_id, why in report.failures.items():
            console.print(f"[red]  not re-wrapped: {escape(user_id)} ({why})[/red]")
    raise typer.Exit(EXIT_REFUSED if report.failures else 0)


@keys_app.command("retire")
def keys_retire(
    kek_id: Annotated[str, typer.Argument(help="The KEK id to retire.")],
    force: Annotated[bool, flag("--force", help="Even if records still use it (they will fail loudly).")] = False,
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
) -> None:
    """Destroy a KEK's bytes (its id is kept, so records still under it fail loudly)."""
    from services.vault import tools

    in_use = _vault_tool(lambda s: tools.retire_key(s, kek_id, force=force), as_json=as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, "retired": kek_id, "records_now_unreadable": in_use}))
    else:
        console.print(f"retired {kek_id}" + (f" ([red]{in_use} records now unreadable[/red])" if in_use else ""))


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, flag("--json", help="Accepted for symmetry: the listing is always JSON.")] = False,
) -> None:
    """KEK ids (never key bytes): active, others, retired, and records per KEK (JSON)."""
    from services.vault import tools

    typer.echo(json.dumps(_vault_tool(tools.key_status, as_json=as_json), indent=2))


connections_app = typer.Typer(help="Connections the vault holds (never a secret).", no_args_is_help=True)
app.add_typer(connections_app, name="connections")


@connections_app.command("list")
def connections_list(
    state: Annotated[ConnectionState | None, typer.Option(help="Only connections in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 1000,
    as_json: Annotated[bool, flag("--json", help="Machine-readable, on stdout.")] = False,
) -> None:
    """Who is connected, in which state, until when — ids, scopes and expiries only."""
    from datetime import UTC, datetime

    from rich.table import Table

    from services.vault.tools import list_connections

    rows = _vault_tool(lambda settings: list_connections(settings, state=state, limit=limit), as_json=as_json)
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
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=0, max=65535)] = 8900,
) -> None:
    """Run the bundled OAuth stand-in alone (NOT for real accounts).

    `ccbridge up --standin-oauth` runs it with the stack and points auth and the vault at it."""
    standins_oauth().run_oauth_standin("127.0.0.1", port)


def main(argv: list[str] | None = None) -> None:
    """The console script. Usage errors are one line (`ccbridge <verb>: <what> (see --help)`) and
    exit 2; every verb's own failures are one or two lines with its documented exit code."""
    # Typer 0.29 carries its own copy of click: its exceptions, not the `click` package's.
    from typer._click import exceptions as click_errors

    try:
        code = app(args=argv, prog_name="ccbridge", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # `ccbridge` / `ccbridge dlq` alone: the help
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        sys.exit(EXIT_USAGE)
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "ccbridge"
        message = " ".join(exc.format_message().split()).replace("Value error, ", "")
        print(f"{where}: {message} (see {where} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click_errors.ClickException as exc:
        print(f"ccbridge: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
