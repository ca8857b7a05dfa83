"""Streamed model output → rate-limited progress notifications (shared by every model tool)."""

from __future__ import annotations

from exai.providers.types import StreamDelta
from exai.resilience import loop as aio
from exai.tools.base import ToolContext

__all__ = ["PROGRESS_INTERVAL_S", "StreamProgress"]

#: Shortest interval between two progress notifications (never one per token).
PROGRESS_INTERVAL_S = 0.25


class StreamProgress:
    """Counts streamed characters and reports them at most every :data:`PROGRESS_INTERVAL_S`.

    Args:
        ctx: the tool call whose client gets the notifications.
        label: what is being produced ("codereview expert analysis"), prefixed to messages.
    """

    def __init__(self, ctx: ToolContext, label: str | None = None) -> None:
        self.ctx = ctx
        self.prefix = f"{label}: " if label else ""
        self.chars = 0
        self.last = -float("inf")

    async def on_delta(self, delta: StreamDelta) -> None:
        self.chars += len(delta.content) + len(delta.reasoning)
        now = aio.current_time()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        what = "thinking" if delta.reasoning and not delta.content else "answering"
        await self.ctx.progress(
            progress=self.chars,
            message=f"{self.prefix}{delta.provider}/{delta.model} {what}: {self.chars} chars",
        )
