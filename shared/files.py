"""Private files (keys, secrets, the stack's own state): mode 0600 from the first byte, never
half-written. One way to write them, for every service and the CLI."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private_file(path: Path, text: str, *, replace: bool = False) -> bool:
    """Write `text` to `path` through a temp file beside it (0600, fsynced): readers see no
    file, or a whole one.

    `replace=False` (a key made on first start): create only — if the file exists (another
    process won the race) theirs is kept and False is returned. `replace=True`: the file is
    renamed over the old one and the directory fsynced (a rotation survives a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if not replace:
            try:
                os.link(tmp, path)  # fails if it exists: the first writer wins
            except FileExistsError:
                return False
            return True
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)
