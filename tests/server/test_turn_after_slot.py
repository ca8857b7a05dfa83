"""A call's round turn, taken once it holds its session slot (f212b6a): what a call parked for
its turn holds, gives back and finds when it is let go.

The pacer here is one whose start turns wait for a gate the test opens (a real pacer lets them
go a few per round, too soon to look at them): a call parked for its turn can then be
cancelled, outlived by its deadline or overtaken by a drain. The core is a daemon's own
(:class:`~exai.server.core.SessionCore` on the daemon's shared parts, the pacer swapped), driven
message by message, its answers read from its outbox.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from exai.server.app import Daemon
from exai.server.auth import Identity
from exai.server.core import SessionCore
from exai.server.pacing import STEPS_PER_PACED_ROUND, RoundPacer
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import make_settings, registry_with, running_daemon

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


class _GatedPacer(RoundPacer):
    """Start turns pass only once :attr:`gate` is set; until then they wait (:attr:`parked`)."""

    def __init__(self) -> None:
        super().__init__(float("inf"))
        self.gate = trio.Event()
        self.parked = 0
        self.turns = 0

    def try_turn(self) -> bool:
        return self.gate.is_set()

    async def turn(self) -> None:
        self.turns += 1
        if self.gate.is_set():
            return
        self.parked += 1
        try:
            await self.gate.wait()
        finally:
            self.parked -= 1


class _Rounds(trio.abc.Instrument):
    """Numbers the scheduler rounds: ``n`` is the current one's."""

    def __init__(self) -> None:
        self.n = 0

    def after_io_wait(self, timeout: float) -> None:
        self.n += 1


class _Runs:
    """A tool ``ran`` that notes each run and then waits ``seconds`` (0: answers at once)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        #: the scheduler round each run began in (see :class:`_Rounds`)
        self.began_in: list[int] = []
        self.rounds = _Rounds()
        self.release = trio.Event()
        self.spec = ToolSpec(
            name="ran",
            description="Test tool: note the run, wait for the test when `hold`.",
            input_schema={
                "type": "object",
                "properties": {"tag": {"type": "string"}, "hold": {"type": "boolean"}},
                "additionalProperties": False,
            },
            handler=self._run,
        )

    async def _run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.started.append(str(args.get("tag", "")))
        self.began_in.append(self.rounds.n)
        if args.get("hold"):
            await self.release.wait()
        return ToolResult(text="ran")


async def _closed(code: int, reason: str) -> None:
    pass


@asynccontextmanager
async def _core(daemon: Daemon, pacer: RoundPacer) -> AsyncIterator[SessionCore]:
    shared = attrs.evolve(daemon.sessions.shared, pacer=pacer)
    core = SessionCore(
        shared, daemon.settings, "127.0.0.1", Identity("anonymous", b""), close=_closed
    )
    async with trio.open_nursery() as nursery:
        core.nursery = nursery
        try:
            yield core
        finally:
            if isinstance(pacer, _GatedPacer):
                pacer.gate.set()  # (a keyed call's wait for its turn outlives its session)
            nursery.cancel_scope.cancel()
            core.release_all()


def _call(id: Any, tag: str, *, hold: bool = False, key: str | None = None) -> str:
    params: dict[str, Any] = {"name": "ran", "arguments": {"tag": tag, "hold": hold}}
    if key is not None:
        params["_meta"] = {"exai/idempotencyKey": key}
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})


def _cancel(id: Any) -> str:
    return json.dumps(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id}}
    )


def _answers(core: SessionCore) -> list[dict[str, Any]]:
    queued = core.outbox.queued()
    core.outbox.written(len(queued))
    return [json.loads(text) for text in queued]


@asynccontextmanager
async def _setup(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Daemon, _Runs]]:
    runs = _Runs()
    settings = make_settings(tmp_path, **overrides)
    async with running_daemon(settings, registry_with(runs.spec)) as daemon:
        yield daemon, runs


async def test_a_call_cancelled_while_parked_for_its_turn_gives_its_session_slot_back(
    tmp_path: Path,
) -> None:
    async with _setup(tmp_path) as (daemon, runs), _core(daemon, _GatedPacer()) as core:
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        assert await core.handle_text(_call(1, "a")) == "call"
        await trio.testing.wait_all_tasks_blocked()
        # parked for its turn, holding its session slot and no other
        assert pacer.parked == 1
        assert core.limiter.borrowed_tokens == 1
        assert daemon.slots.inflight.borrowed_tokens == 0
        assert core.ledger.count == 1

        assert await core.handle_text(_cancel(1)) == "nothing"
        await trio.testing.wait_all_tasks_blocked()

        assert pacer.parked == 0
        assert core.limiter.borrowed_tokens == 0
        assert daemon.slots.inflight.borrowed_tokens == 0
        assert core.ledger.count == 0 and core.ledger.nbytes == 0
        assert not daemon.calls.running and not core.inflight
        assert _answers(core) == []  # (cancelled by its client: no answer, by the spec)
        assert runs.started == []

        # the same id again, turns passing: a new call that runs and is answered
        pacer.gate.set()
        await core.handle_text(_call(1, "b"))
        with trio.fail_after(10):
            while not core.outbox.queued():
                await trio.sleep(0.01)
        (answer,) = _answers(core)
        assert answer["id"] == 1 and "result" in answer, answer
        assert runs.started == ["b"]
        assert core.limiter.borrowed_tokens == 0
        assert daemon.slots.inflight.borrowed_tokens == 0


async def test_a_keyed_call_cancelled_while_parked_for_its_turn_ends_its_reservation(
    tmp_path: Path,
) -> None:
    async with _setup(tmp_path) as (daemon, runs), _core(daemon, _GatedPacer()) as core:
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        await core.handle_text(_call(1, "a", key="k-1"))
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.parked == 1 and core.limiter.borrowed_tokens == 1
        assert "k:anonymous:k-1" in daemon.calls.running

        await core.handle_text(_cancel(1))
        await trio.testing.wait_all_tasks_blocked()

        assert pacer.parked == 0
        assert core.limiter.borrowed_tokens == 0
        assert daemon.slots.inflight.borrowed_tokens == 0
        assert not daemon.calls.running and core.ledger.count == 0
        assert _answers(core) == [] and runs.started == []

        # re-sent with its key: runs (the reservation ended, nothing was stored for it)
        pacer.gate.set()
        await core.handle_text(_call(2, "b", key="k-1"))
        with trio.fail_after(10):
            while not core.outbox.queued():
                await trio.sleep(0.01)
        (answer,) = _answers(core)
        assert answer["id"] == 2 and "result" in answer, answer
        assert runs.started == ["b"]


async def test_calls_parked_for_turns_on_every_session_slot_all_run_once_turns_pass(
    tmp_path: Path,
) -> None:
    # every session slot held by a call parked for its turn, more waiting in the FIFO: nothing
    # waits on anything the parked calls hold but the FIFO, which moves as they finish
    async with (
        _setup(tmp_path, session_max_inflight=2, session_queue_max=8) as (daemon, runs),
        _core(daemon, _GatedPacer()) as core,
    ):
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        for i in range(6):
            await core.handle_text(_call(i, str(i)))
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.parked == 2 and core.queued == 4
        pacer.gate.set()
        with trio.fail_after(10):
            while len(runs.started) < 6 or len(core.outbox.queued()) < 6:
                await trio.sleep(0.01)
        assert sorted(a["id"] for a in _answers(core)) == list(range(6))
        assert core.limiter.borrowed_tokens == 0 and core.queued == 0


async def test_a_keyed_call_parked_for_its_turn_when_the_drain_begins_is_handed_over(
    tmp_path: Path,
) -> None:
    # Before f212b6a a call took its turn before _launch, whose first step hands a keyed call
    # over once the daemon drains (its client re-sends it to a daemon that is not stopping,
    # and never sees an error); parked for its turn after its session slot, it went on to run
    # on the draining daemon.
    async with _setup(tmp_path) as (daemon, runs), _core(daemon, _GatedPacer()) as core:
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        await core.handle_text(_call(1, "a", key="k-1"))
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.parked == 1
        handed_over = daemon.stats.rejections["handed_over"]

        daemon.readiness.draining = True
        pacer.gate.set()
        with trio.fail_after(10):
            while daemon.calls.running:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()

        assert runs.started == []
        assert daemon.stats.rejections["handed_over"] == handed_over + 1
        assert _answers(core) == []  # (no answer: the client re-sends it elsewhere)
        assert core.limiter.borrowed_tokens == 0
        assert daemon.slots.inflight.borrowed_tokens == 0
        assert core.ledger.count == 0


async def test_an_unkeyed_call_parked_for_its_turn_when_the_drain_begins_is_refused(
    tmp_path: Path,
) -> None:
    async with _setup(tmp_path) as (daemon, runs), _core(daemon, _GatedPacer()) as core:
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        await core.handle_text(_call(1, "a"))
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.parked == 1

        daemon.readiness.draining = True
        pacer.gate.set()
        with trio.fail_after(10):
            while not core.outbox.queued():
                await trio.sleep(0.01)

        (answer,) = _answers(core)
        assert answer["error"]["data"]["reason"] == "overloaded", answer
        assert runs.started == []
        assert core.limiter.borrowed_tokens == 0
        assert daemon.slots.inflight.borrowed_tokens == 0


async def test_calls_let_go_by_the_daemon_slots_at_once_begin_a_few_per_round(
    tmp_path: Path,
) -> None:
    # 40 connections' calls hold the daemon's 40 slots; 40 more connections' calls took their
    # turns and wait for those slots. The 40 running calls end in one round: their slots go to
    # the waiters at once. Every round is past a budget of 0, so the pacer's promise is at
    # most STEPS_PER_PACED_ROUND calls beginning per round; the waiters, whose turns were
    # rounds ago, all began in the same round (no turn was taken after a wait for a slot).
    n = 40
    overrides = {"round_budget_s": 0.0, "max_inflight": n, "slot_wait_s": 600.0}
    async with _setup(tmp_path, **overrides) as (daemon, runs):
        pacer = daemon.sessions.shared.pacer
        trio.lowlevel.add_instrument(runs.rounds)
        try:
            async with trio.open_nursery() as nursery:
                cores = [await nursery.start(_serve_core, daemon, pacer) for _ in range(2 * n)]
                for i, core in enumerate(cores[:n]):
                    await core.handle_text(_call(i, f"first-{i}", hold=True))
                with trio.fail_after(10):
                    while len(runs.started) < n:
                        await trio.sleep(0.01)
                for i, core in enumerate(cores[n:]):
                    await core.handle_text(_call(i, f"second-{i}"))
                with trio.fail_after(10):  # (each has taken its turn and waits for a slot)
                    while pacer.waiting or daemon.slots.inflight.statistics().tasks_waiting < n:
                        await trio.sleep(0.01)
                began = len(runs.began_in)
                runs.release.set()
                with trio.fail_after(10):
                    while len(runs.started) < 2 * n:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(runs.rounds)
    per_round = collections.Counter(runs.began_in[began:])
    assert max(per_round.values()) <= STEPS_PER_PACED_ROUND, per_round


async def _serve_core(daemon: Daemon, pacer: RoundPacer, task_status: Any) -> None:
    async with _core(daemon, pacer) as core:
        task_status.started(core)
        await trio.sleep_forever()


class _SlowSharedResults:
    """Results shared by daemons (as Redis holds them) whose lookups answer once
    :attr:`answer` is set: nothing stored."""

    def __init__(self) -> None:
        self.answer = trio.Event()

    async def get(self, key: str) -> dict[str, Any] | None:
        await self.answer.wait()
        return None

    async def put(self, key: str, payload: dict[str, Any], ttl_s: float) -> None:
        pass


async def test_a_keyed_call_takes_its_turn_after_its_lookup_of_a_shared_result(
    tmp_path: Path,
) -> None:
    # A keyed call first asks the daemons' shared results (Redis: a round trip, rounds later).
    # Its turn was looked at when it arrived, in a round within its budget, and counted as
    # taken: the call then began in whatever round the lookup ended in, turns waiting or not.
    async with _setup(tmp_path) as (daemon, runs), _core(daemon, _GatedPacer()) as core:
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        shared = _SlowSharedResults()
        daemon.runner.shared = shared
        pacer.gate.set()  # (turns pass as the call arrives)
        await core.handle_text(_call(1, "a", key="k-1"))
        await trio.testing.wait_all_tasks_blocked()
        pacer.gate = trio.Event()  # (and no longer once its lookup has ended)
        shared.answer.set()
        await trio.testing.wait_all_tasks_blocked()
        assert runs.started == [] and pacer.parked == 1

        pacer.gate.set()
        with trio.fail_after(10):
            while not core.outbox.queued():
                await trio.sleep(0.01)
        (answer,) = _answers(core)
        assert "result" in answer and runs.started == ["a"], answer


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
@pytest.mark.parametrize("key", [None, "k-1"], ids=["unkeyed", "keyed"])
async def test_a_call_whose_deadline_passes_while_parked_for_its_turn_is_answered_at_once(
    tmp_path: Path, key: str | None
) -> None:
    # A real pacer whose every round is past its budget of 0, letting one turn go per round,
    # with thousands of turns parked before the call's. Its turn is taken in the execution's
    # shielded wait scope, and nothing cut that wait at the call's deadline: the call kept its
    # session slot and was answered only once its turn came, thousands of rounds later.
    parked = 2000
    async with (
        _setup(tmp_path, call_timeout_s=5.0) as (daemon, runs),
        _core(daemon, RoundPacer(0.0, 1)) as core,
    ):
        pacer = core.shared.pacer
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        async with trio.open_nursery() as nursery:
            for _ in range(parked):
                nursery.start_soon(pacer.turn)
            await trio.lowlevel.checkpoint()  # (they park: every turn waits a round)
            assert await core.handle_text(_call(1, "a", key=key)) == "call"
            for _ in range(10):
                await trio.lowlevel.checkpoint()
            assert core.limiter.borrowed_tokens == 1 and runs.started == []
            clock.jump(6.0)  # past the call's deadline
            rounds = 0
            while not core.outbox.queued():
                rounds += 1
                assert rounds < 50, f"not answered {rounds} rounds after its deadline"
                await trio.lowlevel.checkpoint()
            assert pacer.waiting > parked // 2  # (its turn would have been far off)
            (answer,) = _answers(core)
            assert answer["id"] == 1 and answer["error"]["data"]["reason"] == "timeout", answer
            await trio.testing.wait_all_tasks_blocked()
            assert runs.started == []
            assert core.limiter.borrowed_tokens == 0
            assert daemon.slots.inflight.borrowed_tokens == 0
            assert not daemon.calls.running and not core.inflight


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
async def test_a_call_whose_deadline_passes_while_it_waits_for_a_daemon_slot_is_expired(
    tmp_path: Path,
) -> None:
    # The wait for the identity and daemon-wide slots was bounded by slot_wait_s alone: a call
    # whose deadline came first waited on past it, and was answered "overloaded" at the end.
    overrides = {"call_timeout_s": 5.0, "slot_wait_s": 600.0, "max_inflight": 1}
    async with (
        _setup(tmp_path, **overrides) as (daemon, runs),
        _core(daemon, RoundPacer(float("inf"))) as core,
    ):
        await daemon.slots.inflight.acquire()  # (the daemon's one slot, held by the test)
        try:
            started = trio.current_time()
            await core.handle_text(_call(1, "waits"))
            with trio.fail_after(1000):
                while not core.outbox.queued():
                    await trio.sleep(0.5)
            (answer,) = _answers(core)
            assert answer["error"]["data"]["reason"] == "timeout", answer
            assert trio.current_time() - started < 10  # (virtual time: its deadline, 5 s)
            assert core.limiter.borrowed_tokens == 0 and runs.started == []
        finally:
            daemon.slots.inflight.release()
