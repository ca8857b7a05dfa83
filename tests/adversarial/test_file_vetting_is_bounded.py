"""Issue 11.5: vetting the paths a call names is capped, linear, off the loop and under the
call's deadline.

Against a real ``exai serve``: 60,000 paths are refused at once (-32602 naming the field and the
cap), and so is a path with more components than a path may have; batches at the cap, made of
the most expensive paths to resolve (every component a symlink hop), are vetted in worker
threads while a well-behaved client is served; calls whose vetting outlives their deadline end
with the deadline error; and SIGTERM stops the daemon with such attacks in flight (bounded by
the drain, not timed).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.adversarial.harness import SERVED_WITHIN_S, LiveDaemon, argument_error, live_daemon

pytestmark = pytest.mark.anyio

#: the documented caps (exai.tools.sandbox.MAX_PATHS, MAX_PATH_COMPONENTS), stated as the contract
MAX_PATHS = 100
MAX_PATH_COMPONENTS = 128


@pytest.fixture
def root() -> Iterator[Path]:
    # a short root, so 60,000 paths under it fit in one 4 MiB frame as in the issue
    r = Path(tempfile.mkdtemp(prefix="v", dir="/tmp"))
    try:
        (r / "a").symlink_to(".")  # root/a/a/a/… is root again: costly to resolve, inside
        for i in range(MAX_PATHS):
            (r / f"f{i}.py").write_text(f"value_{i} = {i}\n")
        yield r
    finally:
        shutil.rmtree(r, ignore_errors=True)


def many_paths(root: Path) -> list[str]:
    """60,000 distinct paths under the root, of files that do not exist (each one a note)."""
    paths = [f"{root}/{i}" for i in range(60_000)]
    assert len(json.dumps(paths)) < 4 * 1024 * 1024 - 1000
    return paths


def deep_paths(root: Path) -> list[str]:
    """``MAX_PATHS`` distinct files, each named through as many symlink hops as a path may
    have components: the most expensive batch a client can send."""
    hops = MAX_PATH_COMPONENTS - len(root.parts)
    prefix = str(root) + "/a" * hops
    return [f"{prefix}/f{i}.py" for i in range(MAX_PATHS)]


@asynccontextmanager
async def daemon_with_mock(
    tmp_path: Path, root: Path, **env: str
) -> AsyncIterator[tuple[LiveDaemon, MockUpstream]]:
    async with (
        MockUpstream(models=("mock-fast",)) as mock,
        live_daemon(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
            EXAI_FILE_ROOTS=str(root),
            **env,
        ) as daemon,
    ):
        yield daemon, mock


def chat(files: list[str]) -> dict[str, Any]:
    return {"prompt": "look at these", "model": "mock-fast", "files": files}


async def test_sixty_thousand_paths_are_refused_at_once_naming_the_field_and_the_cap(
    tmp_path: Path, root: Path
) -> None:
    paths = many_paths(root)
    step = {
        "step": "look",
        "step_number": 1,
        "total_steps": 2,
        "next_step_required": True,
        "findings": "-",
        "relevant_files": paths,
    }
    async with daemon_with_mock(tmp_path, root) as (daemon, mock):
        async with daemon.client() as rpc:
            for n in range(10):
                with trio.fail_after(SERVED_WITHIN_S):
                    reply = await rpc.call("chat", chat(paths), id=100 + n)
                err = argument_error(reply)
                assert err["data"]["field"] == "arguments.files"
                assert f"at most {MAX_PATHS} items (got 60000)" in err["message"]
            with trio.fail_after(SERVED_WITHIN_S):
                reply = await rpc.call("analyze", step, id=200)
            assert argument_error(reply)["data"]["field"] == "arguments.relevant_files"
        await daemon.assert_serves()
        assert mock.chat_requests == []


async def test_batches_at_the_cap_are_vetted_off_the_loop_while_a_client_is_served(
    tmp_path: Path, root: Path
) -> None:
    paths = deep_paths(root)
    async with daemon_with_mock(tmp_path, root) as (daemon, mock):
        replies: list[dict[str, Any]] = []

        async def attacker() -> None:
            async with daemon.client() as rpc:
                with trio.fail_after(SERVED_WITHIN_S * 4):
                    replies.append(await rpc.call("chat", chat(paths)))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(attacker)
            for _ in range(5):  # served while the batches are vetted
                await daemon.assert_serves()
        assert len(replies) == 8
        for reply in replies:
            assert reply["result"]["isError"] is False, json.dumps(reply)[:300]
        sent = json.dumps(mock.chat_requests[-1].json)
        assert "value_0 = 0" in sent


async def test_vetting_that_outlives_the_call_deadline_ends_the_call_with_the_deadline_error(
    tmp_path: Path, root: Path
) -> None:
    paths = deep_paths(root)
    async with daemon_with_mock(tmp_path, root, EXAI_CALL_TIMEOUT_S="0.02") as (daemon, mock):
        replies: list[dict[str, Any]] = []

        async def attacker() -> None:
            async with daemon.client() as rpc:
                with trio.fail_after(SERVED_WITHIN_S):
                    replies.append(await rpc.call("chat", chat(paths)))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(attacker)
        assert [r["error"]["data"]["reason"] for r in replies] == ["timeout"] * 8, replies
        await daemon.assert_serves()
        assert mock.chat_requests == []


async def test_a_path_with_too_many_components_is_refused_before_it_is_resolved(
    tmp_path: Path, root: Path
) -> None:
    bogus = str(root) + "/x" * 2000  # 2,000 components to resolve, no symlink needed
    async with daemon_with_mock(tmp_path, root) as (daemon, _):
        reply = await daemon.call("chat", chat([bogus]))
        assert argument_error(reply)["data"]["rule"] == "bad_path"
        assert f"at most {MAX_PATH_COMPONENTS}" in argument_error(reply)["message"]
        await daemon.assert_serves()


async def test_sigterm_stops_the_daemon_while_vetting_attacks_are_in_flight(
    tmp_path: Path, root: Path
) -> None:
    many = many_paths(root)
    deep = deep_paths(root)
    async with daemon_with_mock(tmp_path, root, EXAI_DRAIN_TIMEOUT_S="1") as (daemon, _):
        await daemon.assert_serves()
        conns: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def attacker(files: list[str], ready: trio.Event) -> None:
                async with daemon.client() as rpc:
                    await rpc.start_call("chat", chat(files), id=1)
                    ready.set()
                    conns.append(rpc)
                    await trio.sleep_forever()

            started = []
            for files in (many, deep) * 4:
                ready = trio.Event()
                started.append(ready)
                nursery.start_soon(attacker, files, ready)
            with trio.fail_after(SERVED_WITHIN_S):
                for ready in started:
                    await ready.wait()
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                code = await trio.to_thread.run_sync(daemon.proc.wait, SERVED_WITHIN_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"exai serve still running {SERVED_WITHIN_S:g}s after SIGTERM"
                ) from None
            nursery.cancel_scope.cancel()
        assert code == 0, "\n".join(daemon.stderr_lines[-20:])
        assert any("daemon.stopped" in line for line in daemon.stderr_lines)
