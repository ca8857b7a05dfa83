"""Executions at unit level: the orphan grace of a keyed call, the deadline and cancellation
sharing one scope (issue 18: one cancel scope per run, not two)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from exai.server.calls import CallRegistry, Execution, Watcher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def registry() -> CallRegistry:
    return CallRegistry(ttl_s=600.0, max_entries=100, max_bytes=1 << 20, orphan_grace_s=30.0)


def watcher() -> Watcher:
    return Watcher(lambda msg: None, None)


async def test_a_keyed_call_joined_then_left_by_everyone_is_cancelled_after_its_grace() -> None:
    # The orphan watch waits on the execution's "orphaned" event; a second watcher joining
    # must not swap that event for one the watch never sees.
    calls = registry()
    ex = Execution(key="k:a:1", tool="t", client_key=True)
    first, second = watcher(), watcher()
    ex.attach(first)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls.orphan_watch, ex)
        await trio.testing.wait_all_tasks_blocked()
        ex.attach(second)
        ex.detach(first)
        ex.detach(second)
        with trio.fail_after(60):
            await trio.sleep(31)
        assert ex.cancelled
        assert ex.scope.cancel_called


async def test_a_keyed_call_adopted_within_its_grace_runs_on() -> None:
    calls = registry()
    ex = Execution(key="k:a:1", tool="t", client_key=True)
    ex.attach(watcher())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls.orphan_watch, ex)
        await trio.testing.wait_all_tasks_blocked()
        ex.detach(ex.watchers[0])
        await trio.sleep(10)
        ex.attach(watcher())
        await trio.sleep(100)
        assert not ex.cancelled
        nursery.cancel_scope.cancel()


async def test_an_unkeyed_call_left_by_its_only_watcher_is_cancelled_at_once() -> None:
    ex = Execution(key="s:x:1", tool="t", client_key=False)
    w = watcher()
    ex.attach(w)
    ex.detach(w)
    assert ex.cancelled and ex.scope.cancel_called


async def test_the_run_scope_ends_the_run_at_the_deadline_without_marking_it_cancelled() -> None:
    ex = Execution(key="s:x:1", tool="t", client_key=False, deadline=trio.current_time() + 5)
    with trio.move_on_after(60) as guard:  # (a hang guard: the scope must end first)
        with ex.scope:
            await trio.sleep_forever()
    assert not guard.cancelled_caught
    assert ex.scope.cancelled_caught and not ex.cancelled
    assert trio.current_time() == pytest.approx(ex.deadline)
