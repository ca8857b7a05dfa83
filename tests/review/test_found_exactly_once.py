"""Review finding: a request that joined a reserved call must be answered."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import Rpc, make_settings, registry_with, running_daemon, ws

pytestmark = pytest.mark.anyio

OBJ: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": True}


class Probe:
    """A tool that counts its executions and waits for ``release``."""

    def __init__(self, name: str = "probe") -> None:
        self.started = 0
        self.started_event = trio.Event()
        self.release = trio.Event()
        self.spec = ToolSpec(name=name, description="probe", input_schema=OBJ, handler=self.run)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.started += 1
        self.started_event.set()
        if args.get("wait", True):
            await self.release.wait()
        return ToolResult(text=f"done {self.started}")


def _call(
    rid: Any, meta: dict[str, Any] | None = None, *, name: str = "probe", **args: Any
) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": args}
    if meta is not None:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


async def test_a_request_that_joined_a_call_still_waiting_for_slots_gets_its_answer(tmp_path):
    """Connection A reserves key K and waits for a slot; connection B sends K and joins the
    reservation; then A goes away. B still wants the call: it must run and B must get its
    answer. Today A's responder owns the slot wait, so A's cancellation ends the reservation
    with no payload and B's request is never answered (B's client hangs)."""
    probe, blocker = Probe(), Probe("blocker")
    meta = {"exai/idempotencyKey": "bridge-y:1"}
    settings = make_settings(tmp_path, max_inflight=1, slot_wait_s=5.0)
    async with (
        running_daemon(settings, registry_with(probe.spec, blocker.spec)) as d,
        ws(d) as other,
        ws(d) as b,
    ):
        await Rpc(other).send(_call(1, name="blocker"))  # holds the only global slot
        with trio.fail_after(5):
            await blocker.started_event.wait()
        rb = Rpc(b)
        async with ws(d) as a:
            await Rpc(a).send(_call(1, meta, wait=False))
            await trio.sleep(0.1)
            await rb.send(_call(1, meta, wait=False))  # joins A's reservation
            await trio.sleep(0.1)
        await trio.sleep(0.1)  # A is gone
        blocker.release.set()
        answer = None
        with trio.move_on_after(3):
            answer = await rb.response(1)
        assert answer is not None, "the request that joined was never answered"
        assert "result" in answer and probe.started == 1
