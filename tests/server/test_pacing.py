"""The round pacer: once a scheduler round has run for ``round_budget_s``, no more calls begin
and no more answers are taken in during it; they wait, and a few go on in each round after.

A storm's intake made scheduler rounds of 30–75 ms (``benchmarks run slow_upstream --full``:
every connection's next call began in the same round, and their answers were taken in in one
round again; issue 18). These tests count rounds with a trio instrument (``after_io_wait``
runs once per round) and give the pacer a clock of their own: never the wall clock.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import exai.providers.transport as transport
from exai.providers import ProviderRouter
from exai.providers.types import ChatRequest
from exai.server.app import Daemon
from exai.server.calls import CallRunner
from exai.server.pacing import STEPS_PER_PACED_ROUND, RoundPacer
from exai.storage.service import ConversationService
from exai.testing import MockUpstream
from exai.tools import default_registry
from tests.daemon_tools import SLEEP
from tests.helpers import Rpc, make_settings, running_daemon, ws
from tests.providers.conftest import provider_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


class _Rounds(trio.abc.Instrument):
    """Numbers the scheduler rounds: ``n`` is the current one's."""

    def __init__(self) -> None:
        self.n = 0

    def after_io_wait(self, timeout: float) -> None:
        self.n += 1


class _Clock:
    """A clock the test sets (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _counted(pacer: RoundPacer, callers: int) -> tuple[collections.Counter[int], list[int]]:
    """``callers`` tasks take a turn at once: the turns that passed per round, and the round
    each passed in, listed in the order the callers asked."""
    rounds = _Rounds()
    trio.lowlevel.add_instrument(rounds)
    per_round: collections.Counter[int] = collections.Counter()
    asked: list[int] = []
    passed_in: dict[int, int] = {}
    go = trio.Event()

    async def caller(i: int) -> None:
        await go.wait()
        asked.append(i)
        await pacer.turn()
        per_round[rounds.n] += 1
        passed_in[i] = rounds.n

    try:
        async with trio.open_nursery() as nursery:
            for i in range(callers):
                nursery.start_soon(caller, i)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
    finally:
        trio.lowlevel.remove_instrument(rounds)
    return per_round, [passed_in[i] for i in asked]


async def test_past_the_budget_per_round_turns_pass_in_a_round_in_arrival_order() -> None:
    pacer = RoundPacer(0.0, 3)  # (every round is past a budget of 0)

    per_round, rounds_in_arrival_order = await _counted(pacer, 20)

    assert sum(per_round.values()) == 20
    assert max(per_round.values()) == 3
    # first come, first served: nobody passes in a round before one who asked earlier
    assert rounds_in_arrival_order == sorted(rounds_in_arrival_order)
    assert pacer.waiting == 0 and pacer.waited == 20


async def test_nothing_caps_the_turns_over_rounds() -> None:
    # 100 turns at 10 per round take 10 rounds and a few, not more: a bound per round, not a rate
    pacer = RoundPacer(0.0, 10)

    per_round, _ = await _counted(pacer, 100)

    assert len(per_round) <= 12


async def test_turns_pass_at_once_until_the_round_has_run_for_the_budget() -> None:
    clock = _Clock()
    pacer = RoundPacer(0.010, 2, clock=clock)
    await pacer.turn()  # (the first turn of a run waits one round: it starts the timing)
    clock.now = 0.004  # 4 ms into this round
    for _ in range(20):
        with trio.testing.assert_no_checkpoints():
            await pacer.turn()
    clock.now = 0.011  # past the budget: the next turn waits for the next round
    assert not pacer.try_turn()
    rounds = _Rounds()
    trio.lowlevel.add_instrument(rounds)
    try:
        await pacer.turn()
    finally:
        trio.lowlevel.remove_instrument(rounds)
    assert rounds.n >= 1 and pacer.waited == 2


async def test_one_turn_at_a_time_waits_only_for_the_first_round() -> None:
    # concurrency 1 on an idle loop: short rounds, no turn waits but the first (the timing)
    clock = _Clock()
    pacer = RoundPacer(0.010, clock=clock)
    for _ in range(50):
        await pacer.turn()
        await trio.lowlevel.checkpoint()  # the next round
        clock.now += 0.003

    assert pacer.waited == 1


async def test_an_infinite_budget_never_makes_a_turn_wait() -> None:
    # EXAI_ROUND_BUDGET_S=inf, pacing off. Before: the first turn waited a round (the timing
    # it installed was never needed).
    pacer = RoundPacer(float("inf"))
    for _ in range(5):
        with trio.testing.assert_no_checkpoints():
            await pacer.turn()
            await pacer.reads.turn()

    assert pacer.waited == 0


async def test_waiters_cancelled_leave_without_a_turn_and_the_pacer_goes_on() -> None:
    pacer = RoundPacer(0.0, 1)
    passed: set[int] = set()
    cancelled: set[int] = set()
    scopes: dict[int, trio.CancelScope] = {}
    go = trio.Event()

    async def caller(i: int) -> None:
        with trio.CancelScope() as scopes[i]:
            await go.wait()
            try:
                await pacer.turn()
            except trio.Cancelled:
                cancelled.add(i)
                raise
            passed.add(i)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(caller, i)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        while not (passed and pacer.waiting):  # (one passes per round: the rest wait)
            await trio.lowlevel.checkpoint()
        for i in set(scopes) - passed:
            scopes[i].cancel()

    assert cancelled and passed and not cancelled & passed
    assert cancelled | passed == set(range(10))
    await trio.testing.wait_all_tasks_blocked()
    assert pacer.waiting == 0 and not pacer._pumping  # (the pump is gone with the waiters)
    await pacer.turn()  # and the pacer goes on


async def _lanes(pacer: RoundPacer, starts: int, reads: int) -> tuple[list[int], list[int]]:
    """``starts`` call starts wait, then ``reads`` answer reads ask: the rounds each read and
    each start waited (passed in less asked in), in the order they asked."""
    rounds = _Rounds()
    trio.lowlevel.add_instrument(rounds)
    waits: dict[str, list[int]] = {"start": [], "read": []}

    async def caller(kind: str, turn: Any) -> None:
        asked = rounds.n
        await turn()
        waits[kind].append(rounds.n - asked)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(starts):
                nursery.start_soon(caller, "start", pacer.turn)
            await trio.testing.wait_all_tasks_blocked()  # (every start waits: budget 0)
            for _ in range(reads):
                nursery.start_soon(caller, "read", pacer.reads.turn)
    finally:
        trio.lowlevel.remove_instrument(rounds)
    return waits["start"], waits["read"]


async def test_an_answer_read_waits_for_its_lanes_share_of_a_round_not_for_every_start() -> None:
    # Before: one FIFO; a read of a running call's answer waited for all 40 starts ahead of it
    # (10 rounds at 4 per round), each read of a streamed answer again. (3 rounds: the pump,
    # started for the first turn that waits, lets it go in its second round)
    pacer = RoundPacer(0.0, 4)

    started, reads = await _lanes(pacer, starts=40, reads=1)

    assert len(started) == 40 and reads and reads[0] <= 3, reads


async def test_reads_waiting_round_after_round_leave_the_starts_their_share() -> None:
    # one turn per round: while both lanes wait, the turn alternates between them
    pacer = RoundPacer(0.0, 1)

    started, reads = await _lanes(pacer, starts=1, reads=20)

    assert len(reads) == 20 and started and started[0] <= 3, started


async def test_a_negative_budget_or_no_turn_per_round_is_refused() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        RoundPacer(-1.0)
    with pytest.raises(ValueError, match="at least 1"):
        RoundPacer(0.01, 0)


# ------------------------------------------------------------------ through the daemon


@asynccontextmanager
async def _chat_daemon(
    tmp_path: Path, provider: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[tuple[MockUpstream, ProviderRouter, Daemon]]:
    """A daemon in this trio run serving ``chat`` from one mock upstream (SQLite store), every
    round past its budget (0: each turn waits, so the bound is the one of a long round)."""
    async with MockUpstream(models=("mock-a",)) as upstream:
        config = make_settings(
            tmp_path,
            providers=(
                provider_settings("a", upstream.base_url, None, ("mock-a",), **(provider or {})),
            ),
            fast_models=("mock-a",),
            default_model="mock-a",
            round_budget_s=0.0,
            **settings,
        )
        async with (
            ProviderRouter(config, attempts=1) as router,
            ConversationService.open(config) as conversations,
            running_daemon(
                config, services={"providers": router, "conversations": conversations}
            ) as daemon,
        ):
            yield upstream, router, daemon

#: more than the pacer lets go per round
CONNECTIONS = STEPS_PER_PACED_ROUND + 8


async def test_calls_arriving_at_once_past_the_budget_begin_a_few_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: every connection's call began in the same round (24 here).
    rounds = _Rounds()
    began: collections.Counter[int] = collections.Counter()
    run = CallRunner.run

    async def counted_run(self: CallRunner, *a: Any) -> Any:
        began[rounds.n] += 1  # (an unkeyed call runs once it has its turn and its slots)
        return await run(self, *a)

    monkeypatch.setattr(CallRunner, "run", counted_run)
    # (a budget of 0: every round is past it, so the bound is the one of a long round)
    settings = make_settings(tmp_path, round_budget_s=0.0, max_inflight=64)
    go = trio.Event()
    answers: list[dict[str, Any]] = []

    async def client(daemon: Any, task_status: Any) -> None:
        async with ws(daemon) as conn:
            rpc = Rpc(conn)
            await rpc.request("initialize", {"protocolVersion": "2025-06-18"})
            task_status.started()
            await go.wait()
            answers.append(await rpc.call("version"))

    async with running_daemon(settings) as daemon:
        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                await nursery.start(client, daemon)
            trio.lowlevel.add_instrument(rounds)
            go.set()
        trio.lowlevel.remove_instrument(rounds)

        metrics = daemon.metrics.render().decode()
    assert len(answers) == CONNECTIONS
    assert all("result" in a for a in answers), answers
    assert sum(began.values()) == CONNECTIONS
    assert "exai_paced_steps_total" in metrics and "exai_paced_waiting 0.0" in metrics
    assert max(began.values()) <= STEPS_PER_PACED_ROUND, dict(began)


async def test_answers_arriving_at_once_past_the_budget_are_taken_in_a_few_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: every call whose answer had arrived read it in the same round (24 here).
    rounds = _Rounds()
    reads: collections.Counter[int] = collections.Counter()
    released = False
    fill = transport._fill

    async def counted_fill(*a: Any) -> None:
        await fill(*a)
        if released:
            reads[rounds.n] += 1

    monkeypatch.setattr(transport, "_fill", counted_fill)
    answers: list[dict[str, Any]] = []
    chat = _chat_daemon(
        tmp_path,
        {"max_concurrency": CONNECTIONS, "pool_max": CONNECTIONS},
        session_max_inflight=CONNECTIONS,
        session_rate_per_s=1000.0,
    )
    async with chat as (upstream, _, daemon), ws(daemon) as conn:
        rpc = Rpc(conn)
        await rpc.request("initialize", {"protocolVersion": "2025-06-18"})
        upstream.hold_answers()
        for i in range(CONNECTIONS):
            await rpc.start_call("chat", {"prompt": f"hello {i}"}, id=100 + i)
        with trio.fail_after(30):
            while upstream.held < CONNECTIONS:
                await trio.sleep(0.01)
        trio.lowlevel.add_instrument(rounds)
        released = True
        upstream.release_answers()
        with trio.fail_after(30):
            for i in range(CONNECTIONS):
                answers.append(await rpc.response(100 + i))
        trio.lowlevel.remove_instrument(rounds)

    assert all(a["result"]["isError"] is False for a in answers), answers
    assert sum(reads.values()) >= CONNECTIONS
    assert max(reads.values()) <= STEPS_PER_PACED_ROUND, dict(reads)


async def test_an_answer_read_does_not_wait_behind_a_storm_of_call_starts(tmp_path: Path) -> None:
    # Before: reads and starts shared one FIFO; the read of a running call's answer waited for
    # every start parked ahead of it (9 rounds here for ≈ 200 parked starts; with a thousand
    # connections, a streamed answer waited that long for each of its reads).
    rounds = _Rounds()
    waits: list[int] = []

    class Recording:
        """The daemon's pace of the provider's reads, noting the rounds each turn waited."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def try_turn(self) -> bool:
            return bool(self.inner.try_turn())

        async def turn(self) -> None:
            asked = rounds.n
            await self.inner.turn()
            waits.append(rounds.n - asked)

    flooders = 64
    async with (
        _chat_daemon(tmp_path) as (upstream, router, daemon),
        ws(daemon) as conn,
        trio.open_nursery() as nursery,
    ):
        client = router.providers["a"].client
        client.pace = Recording(client.pace)
        pacer = daemon.sessions.shared.pacer
        rpc = Rpc(conn)
        await rpc.request("initialize", {"protocolVersion": "2025-06-18"})
        upstream.hold_answers()
        await rpc.start_call("chat", {"prompt": "hello"}, id=1)
        with trio.fail_after(30):
            while upstream.held < 1:
                await trio.sleep(0.01)
        go, done = trio.Event(), trio.Event()

        async def flooder(task_status: Any) -> None:
            async with ws(daemon) as flood:
                frpc = Rpc(flood)
                await frpc.request("initialize", {"protocolVersion": "2025-06-18"})
                task_status.started()
                await go.wait()
                for i in range(8):
                    await frpc.start_call("version", {}, id=100 + i)
                await done.wait()

        for _ in range(flooders):
            await nursery.start(flooder)
        trio.lowlevel.add_instrument(rounds)
        waits.clear()
        go.set()
        with trio.fail_after(30):
            while pacer.waiting < 4 * STEPS_PER_PACED_ROUND:  # (4 rounds' worth of starts)
                await trio.lowlevel.checkpoint()
        upstream.release_answers()
        with trio.fail_after(30):
            answer = await rpc.response(1)
        trio.lowlevel.remove_instrument(rounds)
        done.set()

    assert answer["result"]["isError"] is False, answer
    assert waits and max(waits) <= 3, waits


async def test_a_stopped_daemon_gives_a_lent_router_back_unpaced_and_stops_timing_the_run(
    tmp_path: Path,
) -> None:
    # Before: the router kept taking turns of the stopped daemon's pacer (a daemon started
    # again in the same run overrode it; under asyncio its turn had no trio run to wait in),
    # and each daemon's pacer stayed an instrument of the run, called every round for good.
    async with MockUpstream(models=("mock-a",)) as upstream:
        settings = make_settings(
            tmp_path,
            providers=(provider_settings("a", upstream.base_url, None, ("mock-a",)),),
            fast_models=("mock-a",),
            default_model="mock-a",
            round_budget_s=0.0,  # (every turn waits: each one is counted in waited)
        )
        async with (
            ProviderRouter(settings, attempts=1) as router,
            ConversationService.open(settings) as conversations,
        ):
            services = {"providers": router, "conversations": conversations}
            async with running_daemon(settings, services=services) as daemon, ws(daemon) as conn:
                pacer = daemon.sessions.shared.pacer
                rpc = Rpc(conn)
                await rpc.request("initialize", {"protocolVersion": "2025-06-18"})
                assert (await rpc.call("chat", {"prompt": "hello"}))["result"]["isError"] is False
                waited = pacer.waited
                assert waited > 0
            # the router goes on without turns of the stopped daemon's pacer
            answer = await router.complete(
                ChatRequest(messages=({"role": "user", "content": "again"},), model="mock-a")
            )
            assert answer.content
            assert pacer.waited == waited
            # and the pacer no longer hears of the run's rounds
            began = pacer._began
            for _ in range(5):
                await trio.lowlevel.checkpoint()
            assert pacer._began == began


async def test_a_lone_call_waits_for_the_running_slots_of_a_flood_not_for_its_queue(
    tmp_path: Path,
) -> None:
    # 32 connections flood 8 calls each, one slot per connection: 256 calls admitted, 32 can
    # run. Before, every admitted call took its turn before its session slot, so a lone
    # client's call queued behind every turn still waiting (48 at the flood's peak here, one
    # per admitted call at most: 64 a connection by default); now only the calls that hold a
    # slot take turns — the rest wait in their connections' FIFOs, without one.
    flooders, per_flooder = 32, 8
    settings = make_settings(
        tmp_path,
        round_budget_s=0.0,
        max_inflight=512,
        session_max_inflight=1,
        session_rate_per_s=1000.0,
    )
    registry = default_registry()
    registry.register(SLEEP)
    async with running_daemon(settings, registry) as daemon, trio.open_nursery() as nursery:
        conns = []
        for _ in range(flooders + 1):
            conn = await nursery.start(_open_ws, daemon)
            conns.append(Rpc(conn))

        async def flood(rpc: Rpc) -> None:
            for i in range(per_flooder):
                await rpc.start_call("sleep", {"seconds": 60}, id=i)

        for rpc in conns[:flooders]:  # (all at once: 32 calls come in each round)
            nursery.start_soon(flood, rpc)
        with trio.fail_after(30):  # (every round: the lone call comes at the flood's peak)
            while len(daemon.calls.running) < flooders * per_flooder:
                await trio.lowlevel.checkpoint()
        answer = await conns[-1].call("version")
        nursery.cancel_scope.cancel()

        turns = daemon.pacer.waited
    assert "result" in answer, answer
    # (a budget of 0: every turn is one that waited) the flood's 32 running calls and the lone
    # call took turns; the 224 calls queued for their connections' slots took none (all 256
    # did before, and the lone call's turn waited behind every one still in the lane)
    assert turns == flooders + 1, turns


async def _open_ws(daemon: Any, task_status: Any) -> None:
    async with ws(daemon) as conn:
        await Rpc(conn).request("initialize", {"protocolVersion": "2025-06-18"})
        task_status.started(conn)
        await trio.sleep_forever()
