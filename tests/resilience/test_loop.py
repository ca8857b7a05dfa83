"""``exai.resilience.loop``: anyio's clock, scopes and waits, trio's own under trio (issue 18).

Every test runs on both backends (this folder's ``anyio_backend``): the helpers must behave as
the anyio calls they stand for, whatever the loop.
"""

from __future__ import annotations

import math
import socket

import anyio
import pytest
import sniffio
import trio

from exai.resilience import loop as aio

pytestmark = pytest.mark.anyio


async def test_the_clock_is_the_loops() -> None:
    # (trio's MockClock stands still between the two reads; asyncio's real clock does not)
    assert aio.current_time() == pytest.approx(anyio.current_time(), abs=0.5)
    before = aio.current_time()
    await anyio.sleep(0.01)
    assert aio.current_time() - before >= 0.01
    assert aio.current_time() == pytest.approx(anyio.current_time(), abs=0.5)


async def test_trio_gets_trios_own_scope_and_others_anyios() -> None:
    scope = aio.cancel_scope(deadline=aio.current_time() + 5, shield=True)
    if sniffio.current_async_library() == "trio":
        assert type(scope) is trio.CancelScope
    else:
        assert isinstance(scope, anyio.CancelScope)
    assert scope.shield and scope.deadline == pytest.approx(anyio.current_time() + 5, abs=0.5)


async def test_a_scope_deadline_cancels_and_is_caught() -> None:
    with aio.move_on_after(0.01) as scope:
        await anyio.sleep(10)
    assert scope.cancelled_caught
    with aio.move_on_after(None) as forever:
        await anyio.lowlevel.checkpoint()
    assert forever.deadline == math.inf and not forever.cancelled_caught
    with aio.cancel_scope() as moved:
        moved.deadline = aio.current_time() + 0.01
        await anyio.sleep(10)
    assert moved.cancelled_caught


async def test_the_effective_deadline_is_anyios() -> None:
    assert aio.current_effective_deadline() == anyio.current_effective_deadline() == math.inf
    with aio.move_on_after(5):
        assert aio.current_effective_deadline() == anyio.current_effective_deadline()
        assert aio.current_effective_deadline() < math.inf
        with aio.cancel_scope() as scope:
            scope.cancel()
            assert aio.current_effective_deadline() == anyio.current_effective_deadline()


async def test_checkpoint_if_cancelled_raises_only_when_cancelled() -> None:
    with aio.cancel_scope() as scope:
        await aio.checkpoint_if_cancelled()  # not cancelled: goes on
        scope.cancel()
        await aio.checkpoint_if_cancelled()
        raise AssertionError("not reached")  # pragma: no cover
    assert scope.cancelled_caught


async def test_wait_readable_waits_for_data_and_maps_a_close_to_anyios_error() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.send(b"x")
        with anyio.fail_after(5):
            await aio.wait_readable(a)
        assert a.recv(1) == b"x"

        async def close_soon() -> None:
            await anyio.sleep(0.01)
            anyio.notify_closing(a)
            a.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_soon)
            with pytest.raises(anyio.ClosedResourceError):
                with anyio.fail_after(5):
                    await aio.wait_readable(a)
    finally:
        a.close()
        b.close()


async def test_a_socket_closed_before_the_wait_is_closed_and_leaves_no_wait_behind() -> None:
    """A socket closed before the wait (its descriptor is -1) is ``ClosedResourceError``, every
    time. Before: trio registered a wait for descriptor -1, failed with ``ValueError`` and left
    the registration behind, so the next wait on any closed socket got ``BusyResourceError``
    (the fault eb814ae fixed in the server's ``ProgressStream``); asyncio raised ``ValueError``.
    Live sockets are waited on as before."""
    for _ in range(2):
        a, b = socket.socketpair()
        a.close()
        with pytest.raises(anyio.ClosedResourceError), anyio.fail_after(5):
            await aio.wait_readable(a)
        b.close()
    c, d = socket.socketpair()
    try:
        c.setblocking(False)
        d.send(b"x")
        with anyio.fail_after(5):
            await aio.wait_readable(c)
            await aio.wait_readable(c.fileno())
        assert c.recv(1) == b"x"
    finally:
        c.close()
        d.close()


async def test_a_wait_on_a_closed_socket_is_still_a_checkpoint() -> None:
    """Before: it raised ``ClosedResourceError`` at once: a loop retrying such waits never let
    another task run (here it would have spun its 100 rounds) nor saw its own cancellation."""
    a, b = socket.socketpair()
    a.close()
    b.close()
    other_ran = anyio.Event()

    async def other() -> None:
        other_ran.set()

    rounds = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        while not other_ran.is_set() and rounds < 100:
            rounds += 1
            with pytest.raises(anyio.ClosedResourceError):
                await aio.wait_readable(a)
    assert other_ran.is_set() and rounds < 100
    with anyio.CancelScope() as scope:
        scope.cancel()
        await aio.wait_readable(a)
    assert scope.cancelled_caught


def test_outside_a_loop_the_clock_raises_as_anyios() -> None:
    with pytest.raises(anyio.NoEventLoopError):
        aio.current_time()


def test_without_trio_and_sniffio_installed_every_call_is_anyios() -> None:
    """``exai.resilience`` needs only anyio (``pip install exai``): the module imports and
    works on asyncio with neither trio nor sniffio importable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['trio'] = None; sys.modules['sniffio'] = None\n"
        "import asyncio\n"
        "from exai.resilience import loop as aio\n"
        "async def main():\n"
        "    with aio.move_on_after(0.01) as scope:\n"
        "        await asyncio.sleep(5)\n"
        "    assert scope.cancelled_caught and aio.current_time() > 0\n"
        "    await aio.checkpoint_if_cancelled()\n"
        "asyncio.run(main())\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr
