"""shared.batching.Coalescer: calls made together are worked on together, a lone call at once,
each caller gets its own outcome."""

from __future__ import annotations

import asyncio

import pytest

from shared.batching import Coalescer


class Recorder:
    def __init__(self, *, gate: asyncio.Event | None = None, fail_whole: BaseException | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.fail_whole = fail_whole

    async def run(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_whole is not None:
            raise self.fail_whole
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_a_lone_call_runs_at_once_alone() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    assert await coalescer.submit(1) == 10
    assert recorder.batches == [[1]]


async def test_calls_made_together_are_one_batch_each_with_its_own_outcome() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    results = await asyncio.gather(*(coalescer.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert recorder.batches == [[1, -2, 3]]
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"  # only that one failed


async def test_calls_made_while_a_batch_runs_form_the_next_batch() -> None:
    gate = asyncio.Event()
    recorder = Recorder(gate=gate)
    coalescer = Coalescer(recorder.run, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(coalescer.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert recorder.batches == [[1]]  # the others wait for the one in flight
    gate.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_batches_are_capped() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run, max_batch=2, max_in_flight=1)
    assert await asyncio.gather(*(coalescer.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert [len(b) for b in recorder.batches] == [2, 2, 1]


async def test_an_error_of_the_whole_batch_reaches_every_caller() -> None:
    recorder = Recorder(fail_whole=ConnectionError("database down"))
    coalescer = Coalescer(recorder.run)
    results = await asyncio.gather(*(coalescer.submit(i) for i in (1, 2)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    recorder.fail_whole = None
    assert await coalescer.submit(5) == 50


async def test_a_caller_that_gave_up_is_left_out() -> None:
    gate = asyncio.Event()
    recorder = Recorder(gate=gate)
    coalescer = Coalescer(recorder.run, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0.01)
    gone = asyncio.ensure_future(coalescer.submit(2))
    kept = asyncio.ensure_future(coalescer.submit(3))
    await asyncio.sleep(0.01)
    gone.cancel()
    gate.set()
    assert await first == 10 and await kept == 30
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert recorder.batches == [[1], [3]]


async def test_a_wrong_number_of_outcomes_fails_the_batch_loudly() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    coalescer = Coalescer(short)
    results = await asyncio.gather(coalescer.submit(1), coalescer.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
