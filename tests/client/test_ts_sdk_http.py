"""Must-show 2 of issue 15: the official TypeScript SDK's ``StreamableHTTPClientTransport``
against a real ``exai serve``: list tools, ``version``, ``chat`` with progress, a two-step
``thinkdeep``, a tool argument error as the SDK's version (2025-11-25) wants it, the session
ended with ``DELETE``, and a slow call aborted by the client (the mock upstream sees its
request end).

The script is ``tests/client/node/ts_sdk_client.mjs``; the SDK (``@modelcontextprotocol/sdk``
from npm) lives outside the repository, in ``~/.cache/exai-tests/npm`` (``EXAI_TEST_NPM_DIR``).
The fixture installs it there with npm when it is missing (``make test`` does the same up
front) and skips the test, saying why, when node or npm is not installed or the install fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.adversarial.harness import live_daemon
from tests.httpmcp import http_url

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).parent / "node" / "ts_sdk_client.mjs"
#: the SDK version the script was written against (pinned: its API is what the script calls)
SDK_VERSION = "1.32.2"
WITHIN_S = 90.0


def npm_dir() -> Path:
    return Path(os.environ.get("EXAI_TEST_NPM_DIR", Path.home() / ".cache" / "exai-tests" / "npm"))


@pytest.fixture(scope="session")
def ts_sdk() -> Path:
    """The installed SDK's root (installs it into :func:`npm_dir` when missing; skips with the
    reason when that cannot be done)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        pytest.skip("node is not installed: the TypeScript SDK test needs node >= 18 and npm")
    root = npm_dir() / "node_modules" / "@modelcontextprotocol" / "sdk"
    if not (root / "package.json").exists():
        if npm is None:
            pytest.skip(
                "npm is not installed: cannot install @modelcontextprotocol/sdk for the test"
            )
        npm_dir().mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", f"@modelcontextprotocol/sdk@{SDK_VERSION}"],
            cwd=npm_dir(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.skip(f"npm install @modelcontextprotocol/sdk failed: {done.stderr[-500:]}")
    return root


async def run_script(sdk: Path, url: str, phase: str, on_line: Any = None) -> list[dict[str, Any]]:
    """Run the node script; its JSON lines. ``on_line(doc, send)`` may answer on stdin."""
    proc = await trio.lowlevel.open_process(
        ["node", str(SCRIPT), str(sdk), url, phase],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    docs: list[dict[str, Any]] = []
    err = bytearray()

    async def send(line: str) -> None:
        assert proc.stdin is not None
        await proc.stdin.send_all(line.encode() + b"\n")

    async def read_err() -> None:
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            err.extend(chunk)

    try:
        with trio.fail_after(WITHIN_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_err)
                assert proc.stdout is not None
                buf = b""
                async for chunk in proc.stdout:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        doc = json.loads(line)
                        docs.append(doc)
                        if on_line is not None:
                            await on_line(doc, send)
                code = await proc.wait()
        assert code == 0, f"node exited {code}: {err.decode(errors='replace')[-2000:]}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return docs


async def test_the_typescript_sdk_calls_tools_over_streamable_http(
    tmp_path: Path, ts_sdk: Path
) -> None:
    async with (
        MockUpstream(models=("mock-fast",), chunk_delay_s=0.02) as mock,
        live_daemon(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        ) as daemon,
    ):
        docs = {d["step"]: d for d in await run_script(ts_sdk, http_url(daemon.url), "calls")}
        assert docs["connected"]["sessionId"].startswith("v1.")
        assert {"version", "chat", "thinkdeep"} <= set(docs["tools"]["names"])
        assert docs["version"]["isError"] is False and "exai" in docs["version"]["text"]
        chat = docs["chat"]
        assert chat["isError"] is False and "mock:mock-fast: hello from typescript" in chat["text"]
        assert chat["progress"] and chat["progress"][0]["message"] == "asking a model"
        assert docs["step1"]["structured"]["status"] == "pause_for_investigation"
        assert docs["step2"]["isError"] is False
        assert len(mock.chat_requests) == 2
        # 2025-11-25: an argument error is a tool result the model can read
        assert docs["bad_args"]["isError"] is True
        assert "arguments.prompt" in docs["bad_args"]["text"]
        assert "terminated" in docs and "closed" in docs
        ended = await daemon.wait_log_events("http.session_ended")
        assert len(ended) == 1
        await daemon.assert_serves()


async def test_the_typescript_sdk_aborting_a_call_ends_the_upstream_request(
    tmp_path: Path, ts_sdk: Path
) -> None:
    async with (
        MockUpstream(models=("mock-fast",), latency_s=120.0) as mock,
        live_daemon(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        ) as daemon,
    ):

        async def on_line(doc: dict[str, Any], send: Any) -> None:
            if doc["step"] == "started":
                while not mock.chat_requests:
                    await trio.sleep(0.02)
                await send("abort")

        docs = {
            d["step"]: d for d in await run_script(ts_sdk, http_url(daemon.url), "cancel", on_line)
        }
        assert docs["cancel"]["outcome"] == "aborted"
        assert docs["after"]["isError"] is False
        with trio.fail_after(WITHIN_S):
            await mock.wait_disconnect(1)
        assert await daemon.metric("exai_calls_total", outcome="cancelled") == 1
        await daemon.assert_serves()


async def test_the_typescript_sdk_ending_its_session_during_a_call_settles_the_call(
    tmp_path: Path, ts_sdk: Path
) -> None:
    # transport.terminateSession() (DELETE /mcp) while a tools/call runs on the session's POST
    # (an SSE stream): the daemon cancelled the call and ended its stream without an answer,
    # and the SDK — which reconnects a POST's stream only after an event id, and rejects a
    # request only on an answer, its timeout or its own close — left callTool pending until its
    # timeout (60 s by default; 30 s here). The call's request now ends with a JSON-RPC error
    # for its id (data.reason "session_ended"): the SDK rejects the call at once.
    async with (
        MockUpstream(models=("mock-fast",), latency_s=120.0) as mock,
        live_daemon(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        ) as daemon,
    ):

        async def on_line(doc: dict[str, Any], send: Any) -> None:
            if doc["step"] == "started":
                while not mock.chat_requests:
                    await trio.sleep(0.02)
                await send("terminate")

        docs = {
            d["step"]: d
            for d in await run_script(ts_sdk, http_url(daemon.url), "terminate", on_line)
        }
        assert docs["terminated"]["sessionId"] is None
        call = docs["call"]
        assert call["outcome"] == "rejected", call
        assert call["code"] == -32000 and "session" in call["error"], call
        with trio.fail_after(WITHIN_S):
            await mock.wait_disconnect(1)  # (the upstream request ended with the call)
        assert await daemon.metric("exai_calls_total", outcome="cancelled") == 1
        await daemon.assert_serves()
