"""The e2b stand-in's own pieces that the SDK tests do not isolate: Connect envelopes and the
allow-listed command interpreter behind process.Process/Start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from standins.e2b import E2BStandin, Shell, envelope, read_envelopes


def test_envelopes_round_trip_with_the_end_stream_flag() -> None:
    first = envelope({"event": {"start": {"pid": 1}}})
    body = first + envelope({}, 0x02)
    assert first[0] == 0 and int.from_bytes(first[1:5], "big") == len(first) - 5
    assert body[len(first)] == 0x02
    assert [(flags, json.loads(data)) for flags, data in read_envelopes(body)] == [
        (0, {"event": {"start": {"pid": 1}}}), (2, {})]


@pytest.fixture
def shell(tmp_path: Path) -> Shell:
    standin = E2BStandin(tmp_path)
    sbx = standin.add_sandbox("sbx-1")
    return Shell(standin, sbx, "user", "/home/user")


def test_allow_listed_commands_act_on_the_sandbox_files(shell: Shell) -> None:
    assert shell.run("mkdir -p -m 700 .claude && echo hi") == (0, b"hi\n", b"")
    sbx = shell.sbx
    sbx.host("/home/user/.claude/f").write_text("x")
    assert shell.run("chmod 600 .claude/f && stat -c '%a %U' /home/user/.claude/f")[:2] == (0, b"600 user\n")
    assert shell.run("mv -f .claude/f .claude/g && test -f .claude/g && cat .claude/g")[:2] == (0, b"x")
    assert shell.run("rm -f -- .claude/g .claude/absent && test -e .claude/g")[0] == 1
    assert shell.run("id -un") == (0, b"user\n", b"")


def test_anything_else_is_command_not_found_and_a_chain_stops(shell: Shell) -> None:
    code, _, err = shell.run("curl https://example.com")
    assert code == 127 and b"command not found" in err
    assert shell.run("false && echo no")[0] == 127
    assert shell.run("echo a | cat")[0] == 2  # pipes are not interpreted
    assert shell.run("echo a; echo b")[0] == 2


def test_ownership_is_simulated_like_posix(shell: Shell, tmp_path: Path) -> None:
    sbx = shell.sbx
    sbx.host("/home/user/f").write_text("x")
    sbx.owners["/home/user/f"] = "user:user"
    code, _, err = shell.run("chown root: /home/user/f")
    assert code == 1 and b"Operation not permitted" in err
    root = Shell(shell.standin, sbx, "root", "/root")
    assert root.run("chown user: /home/user/f")[0] == 0
    assert sbx.owner("/home/user/f") == "user:user"
    sbx.denied.append("/home/user/locked")
    assert shell.run("mkdir -p /home/user/locked")[0] == 1
    # a user cannot write where only root may
    assert shell.run("mkdir -p /etc/x")[0] == 1
