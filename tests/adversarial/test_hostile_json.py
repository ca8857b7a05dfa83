"""Issue 11.4: JSON that is cheap to send and expensive to read is refused before it is read.

Before: a 4 MiB frame of nested arrays cost about 2.3 s of loop time to decode and depth-check
before the message bucket was even consulted, and a few such frames froze every client. Now the
bucket is paid first (a frame costs one message per started 256 KiB), nesting and the number of
values are counted at C speed before any object is built, and the decoder is msgspec.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def _call_with(arguments_json: str, rid: int) -> str:
    head = f'{{"jsonrpc":"2.0","id":{rid},"method":"tools/call","params":{{"name":"version",'
    return head + '"arguments":{"x":' + arguments_json + "}}}"


def hostile_frames() -> dict[str, str]:
    """4 MiB frames each built to be expensive to decode."""
    size = 4 * MiB - 200
    group = "[" * 30 + "]" * 30
    return {
        "nested groups": _call_with("[" + ",".join([group] * (size // 61)) + "]", 1),
        "tiny arrays": _call_with("[" + "[]," * (size // 3) + "[]]", 2),
        "tiny strings": _call_with("[" + '"",' * (size // 3) + '""]', 3),
        "deep": _call_with("[" * 100_000 + "]" * 100_000, 4),
    }


async def test_frames_that_are_expensive_to_decode_are_refused_before_decoding(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon:
        await daemon.assert_serves()
        async with daemon.client() as attacker:
            for name, text in hostile_frames().items():
                await attacker.conn.send_message(text)
                with trio.fail_after(SERVED_WITHIN_S):
                    reply = json.loads(await attacker.conn.get_message())
                error = reply["error"]
                # refused by the scan, by name: never decoded into millions of objects
                assert error["code"] == -32700, (name, error)
                assert {"max_elements", "max_depth"} & set(error["data"]), (name, error)
                await daemon.assert_serves()
        st = (await daemon.status())["daemon"]
        assert st["rejections"].get("session_error", 0) == 0


async def test_large_frames_pay_the_message_bucket_by_size_before_they_are_decoded(
    tmp_path: Path,
) -> None:
    # a burst of 40 messages: 4 MiB frames cost 17 messages each, so the third is over
    async with live_daemon(
        tmp_path, EXAI_SESSION_BURST="40", EXAI_SESSION_RATE_PER_S="1", EXAI_LOG_LEVEL="warning"
    ) as daemon:
        async with daemon.client() as attacker:
            text = hostile_frames()["tiny arrays"]
            outcomes = []
            for _ in range(3):
                await attacker.conn.send_message(text)
                with trio.fail_after(SERVED_WITHIN_S):
                    reply = json.loads(await attacker.conn.get_message())
                outcomes.append(reply["error"]["data"]["reason"])
                assert reply["id"] == 2  # answered with its id, read from the frame's head
        assert outcomes == ["parse_error", "parse_error", "rate_limited"]
        await daemon.assert_serves()
