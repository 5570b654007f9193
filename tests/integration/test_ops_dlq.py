"""`ccbridge dlq list|replay` against the running services on the stack's own nats-server, which
runs production's NATS users: the verbs and the harness connect as `ops`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ccbridge.client import CcbridgeClient
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.ops import list_dead_letters
from ccbridge.stack import Stack
from shared import subjects
from shared.broker import ORIGINAL_SUBJECT_HEADER, REASON_HEADER
from shared.events import SandboxCreated, SandboxCredentialsInjected
from tests.grants import stack_grant


def _cli(*args: str, nats_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ccbridge.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NATS_URL": nats_url})


async def _wait_for(predicate, timeout: float = 15.0):
    for _ in range(int(timeout / 0.1)):
        if value := await predicate():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def stack(tmp_path: Path):
    async with Stack(tmp_path / "data", services=("vault", "sandbox")) as running:
        yield running


async def test_malformed_event_is_listed_with_its_reason(stack: Stack) -> None:
    nc = await stack.connect_nats("ops")
    try:
        await nc.jetstream().publish(subjects.SANDBOX_CREATED, b'{"sandbox_id": 42}', stream=subjects.SANDBOX_STREAM.name)
        letters = await _wait_for(lambda: list_dead_letters(nc, subject=subjects.SANDBOX_CREATED))
    finally:
        await nc.close()
    listed = await asyncio.to_thread(_cli, "dlq", "list", "--json", "--show-body", nats_url=stack.nats_url)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["seq"] for r in rows] == [letters[0].seq]
    assert rows[0]["original_subject"] == "sandbox.created" and rows[0]["reason"]
    assert '"sandbox_id": 42' in rows[0]["body"]


async def test_replay_sends_a_fixed_dead_letter_back_and_removes_it(stack: Stack) -> None:
    user = f"dlq-{uuid.uuid4().hex[:6]}"
    sandbox_id = f"sbx-{uuid.uuid4().hex[:6]}"
    event = SandboxCreated(user_id=user, sandbox_id=sandbox_id, grant=await stack_grant(stack, user, sandbox_id))
    nc = await stack.connect_nats("ops")
    try:
        # As if the event had exhausted its deliveries while the user was not yet connected …
        await nc.jetstream().publish(
            subjects.dead_letter_subject(subjects.SANDBOX_CREATED), event.model_dump_json().encode(),
            headers={REASON_HEADER: "vault_unavailable after 5 deliveries", ORIGINAL_SUBJECT_HEADER: subjects.SANDBOX_CREATED},
            stream=subjects.DLQ_STREAM.name,
        )
        # … and the cause is fixed now.
        await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, "sk-ant-oat01-dlq-replay")
        await asyncio.sleep(0.5)
        (letter,) = await list_dead_letters(nc, subject=subjects.SANDBOX_CREATED)
        async with CcbridgeClient(stack.nats_url, connection=nc) as ccb:
            waiter = ccb.expect_result(event.event_id)
            replayed = await asyncio.to_thread(_cli, "dlq", "replay", str(letter.seq), "--json", nats_url=stack.nats_url)
            assert replayed.returncode == 0, replayed.stderr
            result = await asyncio.wait_for(waiter, 15)
        assert isinstance(result, SandboxCredentialsInjected) and result.sandbox_id == event.sandbox_id
        assert await list_dead_letters(nc, subject=subjects.SANDBOX_CREATED) == []
    finally:
        await nc.close()


async def test_a_replay_that_fails_again_leaves_a_new_dead_letter(tmp_path: Path) -> None:
    """The replay must never lose a letter: the first copy failed (no vault: vault_unavailable,
    dead-lettered once its 1 s retry window is over here), its replay fails the same way within
    JetStream's duplicate window — that second failure is a NEW letter, not a duplicate of the first."""
    env = {"SANDBOX_RETRY_WINDOW_S": "1", "SANDBOX_BREAKER_PROBE_S": "0.2", "VAULT_REQUEST_TIMEOUT": "0.5"}
    async with Stack(tmp_path / "data", services=("sandbox",), env=env) as stack:
        event = SandboxCreated(user_id=f"dlq-{uuid.uuid4().hex[:6]}", sandbox_id=f"sbx-{uuid.uuid4().hex[:6]}")
        nc = await stack.connect_nats("ops")
        try:
            await nc.jetstream().publish(subjects.SANDBOX_CREATED, event.model_dump_json().encode(),
                                         headers={subjects.MSG_ID_HEADER: event.event_id},
                                         stream=subjects.SANDBOX_STREAM.name)
            (first,) = await _wait_for(lambda: list_dead_letters(nc, subject=subjects.SANDBOX_CREATED))
            assert first.reason.startswith("vault_unavailable")

            replayed = await asyncio.to_thread(_cli, "dlq", "replay", str(first.seq), "--json", nats_url=stack.nats_url)
            assert replayed.returncode == 0, replayed.stderr

            async def a_new_letter():
                letters = await list_dead_letters(nc, subject=subjects.SANDBOX_CREATED)
                return [letter for letter in letters if letter.seq != first.seq]

            (second,) = await _wait_for(a_new_letter)
            assert second.reason.startswith("vault_unavailable") and second.body == first.body
            remaining = await list_dead_letters(nc, subject=subjects.SANDBOX_CREATED)
            assert [letter.seq for letter in remaining] == [second.seq]  # the replayed one left, the new one stays
        finally:
            await nc.close()


async def test_replaying_a_missing_letter_is_refused_and_loses_nothing(stack: Stack) -> None:
    replayed = await asyncio.to_thread(_cli, "dlq", "replay", "999999", "--json", nats_url=stack.nats_url)
    assert replayed.returncode == 1
    assert json.loads(replayed.stdout) == [{"seq": 999999, "subject": None, "error": "no dead letter with this sequence number"}]
