"""The ``chat`` tool: one model call, with streamed progress, web search and continuations.

The handler needs ``ctx.services["providers"]`` (a :class:`~exai.providers.ProviderRouter`);
``ctx.services["conversations"]`` is optional. Everything that touches the conversation service
is in :func:`load_history` and :func:`save_turns`, and everything about files in
:func:`embed_files`, so those services can change without touching the rest.

Progress: while the answer streams, the client gets ``notifications/progress`` with the number
of characters received, at most :data:`PROGRESS_INTERVAL_S` apart (never one per token).
"""

from __future__ import annotations

import uuid
from typing import Any

from exai.errors import ToolError
from exai.providers.types import THINKING_MODES, ChatRequest, ChatResponse
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from exai.tools.history import build_history
from exai.tools.progress import StreamProgress
from exai.tools.sandbox import MAX_PATHS

__all__ = [
    "CHAT",
    "INPUT_SCHEMA",
    "check_room",
    "embed_files",
    "load_history",
    "make_chat_tool",
    "save_turns",
]

#: Tokens of earlier turns sent with a continuation.
HISTORY_TOKEN_BUDGET = 24_000

SYSTEM_PROMPT = (
    "You are a senior engineer helping an AI coding agent think. Answer precisely and "
    "concisely; say when you are unsure; prefer concrete code and commands over prose."
)

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "description": "what to ask the model"},
        "model": {
            "type": "string",
            "description": "a model name, 'provider/model', or 'auto' (default)",
        },
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "thinking_mode": {"type": "string", "enum": list(THINKING_MODES)},
        "use_websearch": {"type": "boolean", "default": False},
        "continuation_id": {
            "type": "string",
            "minLength": 1,
            "description": "continue an earlier conversation",
        },
        "files": {
            "type": "array",
            "items": {"type": "string", "pattern": "^/"},
            "maxItems": MAX_PATHS,
            "description": "absolute paths of files to include",
        },
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


async def embed_files(paths: list[str], ctx: ToolContext) -> tuple[str, str | None]:
    """The text of ``paths`` to put in the prompt, and a note for the result.

    The hook for the file service (allowed roots, size caps): until it exists, files are
    accepted and not read, and the result says so.
    """
    if not paths:
        return "", None
    files = ctx.services.get("files")
    if files is not None and hasattr(files, "embed"):
        text = await files.embed(paths, ctx)
        return str(text), None
    return "", f"{len(paths)} file(s) given; files are not read yet by this daemon"


async def load_history(
    ctx: ToolContext, continuation_id: str | None
) -> tuple[Any, list[dict[str, Any]]]:
    """The thread to continue (or a new one) and its history as chat messages.

    Returns ``(None, [])`` when the daemon has no conversation service.
    """
    conv = ctx.services.get("conversations")
    if conv is None:
        if continuation_id:
            raise ToolError("conversations are not available in this daemon; omit continuation_id")
        return None, []
    thread = await conv.start_or_continue(
        continuation_id, "chat", call_key=ctx.call_key, owner=ctx.client
    )
    history = list(build_history(thread, HISTORY_TOKEN_BUDGET)) if continuation_id else []
    return thread, history


def check_room(ctx: ToolContext, thread: Any, turns: int, sizes: dict[str, str]) -> None:
    """Refuse before any upstream call a call whose turns the thread could not keep
    (``sizes``: what the call stores, by argument name); see
    :meth:`~exai.storage.service.ConversationService.check_room`."""
    conv = ctx.services.get("conversations")
    if conv is None or thread is None:
        return
    conv.check_room(
        thread, turns=turns, sizes={k: len(v.encode("utf-8", "replace")) for k, v in sizes.items()}
    )


async def save_turns(
    ctx: ToolContext, thread: Any, prompt: str, files: list[str], resp: ChatResponse
) -> dict[str, Any]:
    """Store the user turn and the answer; returns what the result says about continuing."""
    conv = ctx.services.get("conversations")
    if conv is None or thread is None:
        return {}
    from exai.storage.model import Turn

    key = "chat:" + (ctx.call_key or f"{ctx.session_id}:{ctx.request_id or uuid.uuid4()}")
    after = await conv.add_turns(
        thread,
        [
            Turn(role="user", content=prompt, tool="chat", files=tuple(files)),
            Turn(
                role="assistant",
                content=resp.content,
                tool="chat",
                provider=resp.provider,
                model=resp.model,
            ),
        ],
        key,
        owner=ctx.client,
    )
    remaining = conv.turns_remaining(after)
    # (after.id: a re-run of this call continues the thread its first run created)
    return {"continuation_id": after.id, "remaining_turns": remaining}


def _thread_model(thread: Any) -> str | None:
    """A continuation keeps the model of its thread's last answer (unless one is named)."""
    for turn in reversed(getattr(thread, "turns", ()) or ()):
        if getattr(turn, "role", "") == "assistant" and getattr(turn, "model", ""):
            return str(turn.model)
    return None


async def _chat(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    router = ctx.services.get("providers")
    if router is None:
        raise ToolError("no provider layer is configured in this daemon")
    prompt: str = args["prompt"]
    files: list[str] = list(args.get("files") or [])
    file_text, file_note = await embed_files(files, ctx)
    thread, history = await load_history(ctx, args.get("continuation_id"))
    check_room(ctx, thread, 2, {"arguments.prompt": prompt})

    model = args.get("model") or ctx.settings.default_model or "auto"
    if model == "auto" and thread is not None and history:
        model = _thread_model(thread) or model

    user = prompt if not file_text else f"{prompt}\n\n{file_text}"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *history]
    messages.append({"role": "user", "content": user})
    progress = StreamProgress(ctx)
    await ctx.progress(progress=0, message="asking a model")
    resp: ChatResponse = await router.complete(
        ChatRequest(
            messages=messages,
            model=model,
            tool="chat",
            step="single",
            temperature=args.get("temperature"),
            thinking_mode=args.get("thinking_mode"),
            use_websearch=bool(args.get("use_websearch", False)),
            on_delta=progress.on_delta,
            # known before the answer: a cancelled call's log line and audit record name it
            on_route=lambda prov, mdl: ctx.annotations.update(provider=prov, model=mdl),
        )
    )
    ctx.annotations["provider"] = resp.provider
    ctx.annotations["model"] = resp.model
    ctx.annotations["key_fingerprint"] = resp.key_fingerprint
    ctx.annotations["usage"] = resp.usage.to_dict()

    cont = await save_turns(ctx, thread, prompt, files, resp)
    footer = [f"model: {resp.model} (provider {resp.provider})"]
    if len(resp.attempts) > 1:
        footer.append(
            "fell back after: "
            + ", ".join(f"{a.provider}/{a.model} {a.outcome}" for a in resp.attempts[:-1])
        )
    if cont:
        footer.append(
            f"continuation_id: {cont['continuation_id']} "
            f"({cont['remaining_turns']} turns remaining)"
        )
    if file_note:
        footer.append(file_note)
    structured: dict[str, Any] = {
        "content": resp.content,
        "model": resp.model,
        "provider": resp.provider,
        "usage": resp.usage.to_dict(),
        "attempts": [a.to_dict() for a in resp.attempts],
        "finish_reason": resp.finish_reason,
        **cont,
    }
    if resp.reasoning:
        structured["reasoning"] = resp.reasoning
    if resp.web_search_rounds:
        structured["web_search_rounds"] = resp.web_search_rounds
    if file_note:
        structured["note"] = file_note
    text = resp.content.rstrip() + "\n\n---\n" + "\n".join(footer)
    return ToolResult(text=text, structured=structured)


def make_chat_tool(*, timeout_s: float | None = None) -> ToolSpec:
    """The ``chat`` tool; ``timeout_s`` overrides ``EXAI_CALL_TIMEOUT_S`` for it."""
    return ToolSpec(
        name="chat",
        title="Chat with a model",
        description=(
            "Ask a model (Kimi, GLM or another configured provider) one question, optionally "
            "with web search and files; continue an earlier conversation with continuation_id. "
            "The answer says which model and provider served it."
        ),
        input_schema=INPUT_SCHEMA,
        handler=_chat,
        timeout_s=timeout_s,
    )


CHAT = make_chat_tool()
