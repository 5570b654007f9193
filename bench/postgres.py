"""A private, throwaway PostgreSQL server for harnesses that stop and start the vault's database
(bench/outages.py): `initdb` into a fresh temp dir, `pg_ctl` on a free loopback port with its
unix socket in that dir, trust authentication, database `postgres`.

    with PrivatePostgres() as pg:           # initdb + start
        pg.url                               # postgresql+asyncpg://postgres@127.0.0.1:<port>/postgres
        pg.stop()                            # pg_ctl stop -m fast (an outage)
        pg.start()                           # the same data dir and port again

PostgreSQL refuses to run as root: under root the server runs as the `postgres` account if the
machine has one, else `nobody` (the data dir is created for that account, outside any
root-only directory). Binaries: `pg_ctl` on PATH, else the newest /usr/lib/postgresql/*/bin.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from ccbridge.embedded_nats import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine, or no account to run them as."""


def find_bin_dir() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not candidates:
        raise PostgresUnavailable("no PostgreSQL binaries (pg_ctl) on PATH or under /usr/lib/postgresql/*/bin")
    return candidates[-1].parent


def _run_as() -> pwd.struct_passwd | None:
    """The account the server runs as (None: this process's own, when it is not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and there is no 'postgres' or 'nobody' account to run PostgreSQL as")


class PrivatePostgres:
    def __init__(self, *, bin_dir: Path | None = None, port: int | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = port or free_port()
        self.account = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="ccbridge-pg-"))
        if self.account is not None:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        options: dict[str, object] = {}
        if self.account is not None:
            options = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root),
               "TZ": "UTC"}
        done = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], env=env, cwd=self.root, timeout=timeout,
                              capture_output=True, text=True, check=False, **options)  # type: ignore[call-overload]  # user/group kwargs
        if done.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-1500:] if self.log_file.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-800:]}\n{tail}")

    def start(self) -> Self:
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        server_options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", server_options, "-w",
                  "-t", "60", "start")
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m <mode>`: `fast` ends every session (what an outage looks like to the
        vault: its connections are cut, new ones refused)."""
        if self.running or (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()
