"""The e2b stand-in's own pieces that the SDK tests do not isolate: Connect envelopes and the
allow-listed command interpreter behind process.Process/Start."""

from __future__ import annotations

import json
import os
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
    assert shell.run("false && echo no") == (1, b"", b"")
    assert shell.run("nope && echo no")[0] == 127


def test_lists_pipelines_and_exit_traps_behave_like_bash(shell: Shell) -> None:
    assert shell.run("echo a | cat; echo b") == (0, b"a\nb\n", b"")
    assert shell.run("false || echo c && echo d") == (0, b"c\nd\n", b"")
    assert shell.run("true && false || echo e")[1] == b"e\n"
    assert shell.run("! test -e /nope && echo absent")[1] == b"absent\n"
    assert shell.run("echo x | base64 | base64 -d") == (0, b"x\n", b"")
    assert shell.run("# a comment\necho 'it''s' \"q\" a\\ b") == (0, b"its q a b\n", b"")
    code, out, _ = shell.run("trap 'echo cleanup' EXIT\necho one\nexit 3\necho never")
    assert (code, out) == (3, b"one\ncleanup\n")


@pytest.mark.parametrize("command", ["echo $HOME", "echo \"$(id)\"", "echo `id`", "rm -f /tmp/*", "echo {a,b}",
                                     "cat ~/.profile", "echo a > f", "cat < f", "sleep 1 &", "(echo a)"])
def test_what_the_stand_in_does_not_model_is_refused_not_guessed(shell: Shell, command: str) -> None:
    code, _, err = shell.run(command)
    assert code == 2 and b"unsupported" in err


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


def test_symbolic_links_are_followed_like_linux(shell: Shell) -> None:
    sbx = shell.sbx
    sbx.symlink("/home/user/.claude", "/etc")  # the user planted it
    root = Shell(shell.standin, sbx, "root", "/root")
    assert shell.run("test -L .claude && test -d .claude && stat -c '%U %F' .claude && stat -L -c '%U %a' .claude")[1] \
        == b"user symbolic link\nroot 755\n"
    # root's chown follows the link: the user now owns /etc (what the old backend did)
    assert root.run("chown -h root: /home/user/.claude")[0] == 0
    assert (sbx.owner("/etc"), sbx.owner("/home/user/.claude", follow=False)) == ("root:root", "root:root")
    assert root.run("chown user: /home/user/.claude && chmod 700 /home/user/.claude")[0] == 0
    assert (sbx.owner("/etc"), sbx.mode("/etc")) == ("user:user", 0o700)


def test_the_user_gets_only_what_the_kernel_allows_through_a_link(shell: Shell) -> None:
    sbx = shell.sbx
    sbx.put("/root/.claude.json", '{"secret": 1}', owner="root", mode=0o600)
    sbx.symlink("/home/user/.claude.json", "/root/.claude.json")
    sbx.symlink("/home/user/.claude", "/etc")
    assert shell.run("test -f .claude.json")[0] == 1  # /root is not searchable for the user
    code, _, err = shell.run("cat .claude.json")
    assert code == 1 and b"Permission denied" in err
    for command in ("mkdir -p .claude/x", "chmod 700 .claude", "mv -f /etc/passwd .claude/p", "rm -f .claude/passwd",
                    "chown user: .claude"):
        code, _, err = shell.run(command)
        assert code == 1 and (b"Permission denied" in err or b"not permitted" in err), command
    assert sbx.owner("/etc") == "root:root" and sbx.read("/etc/passwd").startswith(b"root:")
    # but the link itself is the user's: mv/rm replace or remove the link, never its target
    assert shell.run("rm -f .claude && mkdir -m 700 .claude && test ! -L .claude")[0] == 0


def test_sticky_tmp_protects_entries_of_others(shell: Shell) -> None:
    sbx = shell.sbx
    sbx.put("/tmp/root-file", "r", owner="root", mode=0o644)
    sbx.put("/tmp/user-file", "u", owner="user", mode=0o644)
    assert b"not permitted" in shell.run("rm -f /tmp/root-file")[2]
    assert b"not permitted" in shell.run("mv /tmp/user-file /tmp/root-file")[2]
    assert shell.run("mv -f /tmp/user-file .f && cat .f")[:2] == (0, b"u")


def test_verification_tools(shell: Shell) -> None:
    sbx = shell.sbx
    sbx.put("/home/user/a", "same", owner="user", mode=0o600)
    sbx.put("/home/user/b", "same", owner="user", mode=0o600)
    assert shell.run("cmp -s a b && echo same")[1] == b"same\n"
    assert shell.run("cmp -s a /nope")[0] == 2
    assert shell.run("sha256sum -- a")[1].split()[0] == b"0967115f2813a3541eaef77de9d9d5773f1c0c04314b0bbfe4ff3b3b1c55b5d5"
    assert shell.run("head -c 2 -- a")[1] == b"sa"
    sbx.put("/tmp/.ccbridge-stage-x", "old", owner="user", mode=0o644)
    os.utime(sbx.host("/tmp/.ccbridge-stage-x"), (1, 1))
    sbx.put("/tmp/.ccbridge-stage-y", "new", owner="user", mode=0o644)
    sbx.put("/tmp/.ccbridge-stage-z", "root's", owner="root", mode=0o644)
    os.utime(sbx.host("/tmp/.ccbridge-stage-z"), (1, 1))
    assert shell.run("find /tmp -maxdepth 1 -type f -user user -name '.ccbridge-stage-*' -mmin +2 -delete")[0] == 0
    assert [p.name for p in sorted(sbx.host("/tmp").iterdir())] == [".ccbridge-stage-y", ".ccbridge-stage-z"]
