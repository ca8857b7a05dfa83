"""The ``consensus`` tool: several models, each with a stance, consulted at once, then weighed.

::

    {"prompt": "Should we move the queue to Redis Streams?",
     "models": [{"model": "kimi-k2-0905-preview", "stance": "for"},
                {"model": "glm-4.6", "stance": "against"},
                {"model": "glm-4.5", "stance": "neutral",
                 "stance_prompt": "Answer as the on-call SRE who runs it at 3 am."}]}

**Concurrency and time.** Every consultation runs in one task group, at the same time, each
under its own share of the call's deadline: ``share = 0.8 × (time left when the call starts)``
(they run side by side, so each gets the same share; the other 20 % is kept for the synthesis).
A consultation that has not answered when its share ends is cancelled and reported as
``timed_out``; the call itself still returns before its deadline.

**No silent substitution.** Each consultation asks for exactly its model
(``allow_fallback=False``): a provider that fails is reported as ``failed`` with its reason,
not quietly replaced by another model, which would make the "consensus" a lie.

**Outcome per model:** ``answered``, ``failed`` (reason: ``upstream_unavailable``,
``circuit_open``, ``upstream_auth`` …) or ``timed_out``. The call fails only when *no* model
answered (:class:`~exai.errors.UpstreamError` listing every model's reason).

**Synthesis.** With two or more answers, one more call (``step="final"``, so ``auto`` picks a
quality model; ``model`` chooses another) summarises agreements, disagreements and a
recommendation. With only one answer there is nothing to weigh: the synthesis is skipped and
the answer is returned with the failures marked (``synthesis_skipped``). A synthesis that fails
or runs out of time does not throw the answers away: they are returned with
``synthesis_error``.

**Validation.** 2–8 consultations; a duplicate (model, stance) pair, or a model no configured
provider serves, is JSON-RPC -32602 naming ``arguments.models[i]``.
"""

from __future__ import annotations

import functools
import math
import uuid
from typing import Any

import anyio
import attrs

from exai.errors import (
    DeadlineExceeded,
    ExaiError,
    InvalidParams,
    NoProviderError,
    ToolError,
    UpstreamError,
)
from exai.providers.types import THINKING_MODES, ChatRequest, ChatResponse
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from exai.tools.history import build_history
from exai.tools.progress import StreamProgress
from exai.tools.sandbox import MAX_PATHS, context_tokens
from exai.tools.schema import check_schema
from exai.tools.workflow import HISTORY_TOKEN_BUDGET, file_service

__all__ = ["CONSENSUS", "INPUT_SCHEMA", "STANCE_PROMPTS", "Consultation", "make_consensus_tool"]

#: Share of the time left that each (concurrent) consultation may use.
CONSULT_SHARE = 0.8

STANCE_PROMPTS: dict[str, str] = {
    "for": (
        "Your stance: argue FOR the proposal. Make the strongest honest case for it — its "
        "benefits and how to make it work. If it has a fatal flaw, say so anyway: supporting "
        "a bad idea helps no one."
    ),
    "against": (
        "Your stance: argue AGAINST the proposal. Make the strongest honest case against it — "
        "risks, costs, failure modes, better alternatives. If it is genuinely sound, "
        "acknowledge that."
    ),
    "neutral": (
        "Your stance: neutral. Weigh the proposal on its merits: benefits, risks, costs and "
        "alternatives, and say which way the evidence points."
    ),
}

_SYSTEM = (
    "You are one of several expert engineers consulted independently on a technical question. "
    "Answer concisely and concretely; end with a one-line verdict."
)

_SYNTH_SYSTEM = (
    "You synthesise the answers of several models consulted, each with a stance, on one "
    "question. Be faithful to what they said; do not invent positions."
)

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {
            "type": "string",
            "minLength": 1,
            "description": "the question or proposal to consult the models on",
        },
        "models": {
            "type": "array",
            "minItems": 2,
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "model": {"type": "string", "minLength": 1},
                    "stance": {
                        "type": "string",
                        "enum": ["for", "against", "neutral"],
                        "default": "neutral",
                    },
                    "stance_prompt": {
                        "type": "string",
                        "minLength": 1,
                        "description": "a custom stance instruction replacing the default one",
                    },
                },
                "required": ["model"],
                "additionalProperties": False,
            },
            "description": "the models to consult, each with a stance; (model, stance) unique",
        },
        "model": {
            "type": "string",
            "description": "model for the synthesis, or 'auto' (default: a quality model)",
        },
        "files": {
            "type": "array",
            "items": {"type": "string", "pattern": "^/"},
            "maxItems": MAX_PATHS,
            "description": "absolute paths of files every model should see",
        },
        "continuation_id": {"type": "string", "minLength": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "thinking_mode": {"type": "string", "enum": list(THINKING_MODES)},
        "use_websearch": {"type": "boolean", "default": False},
    },
    "required": ["prompt", "models"],
    "additionalProperties": False,
}


@attrs.define(kw_only=True)
class Consultation:
    """One model asked with one stance, and how it ended.

    Attributes:
        outcome: ``pending``, ``answered``, ``failed`` or ``timed_out``.
        reason: the error's machine-readable reason when not answered.
        detail: the error's message when not answered.
    """

    index: int
    model: str
    stance: str
    stance_prompt: str | None = None
    outcome: str = "pending"
    content: str = ""
    served_by: str = ""
    provider: str = ""
    reason: str = ""
    detail: str = ""
    retry_after_s: float | None = None

    @property
    def label(self) -> str:
        custom = ", custom stance" if self.stance_prompt else ""
        return f"{self.model} ({self.stance}{custom})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "stance": self.stance, "outcome": self.outcome}
        if self.stance_prompt:
            out["stance_prompt"] = self.stance_prompt
        if self.outcome == "answered":
            out.update(content=self.content, served_by=self.served_by, provider=self.provider)
        else:
            out.update(reason=self.reason, detail=self.detail)
        return out

    def status_line(self) -> str:
        if self.outcome == "answered":
            return f"answered (by {self.provider}/{self.served_by})"
        if self.outcome == "timed_out":
            return f"timed out — {self.detail}"
        return f"failed — {self.reason}: {self.detail}"


def _consultations(args: dict[str, Any], router: Any) -> list[Consultation]:
    out: list[Consultation] = []
    seen: dict[tuple[str, str], int] = {}
    for i, item in enumerate(args["models"]):
        model = item["model"].strip()
        stance = item.get("stance", "neutral")
        field = f"arguments.models[{i}]"
        if (model, stance) in seen:
            raise InvalidParams(
                f"{field}: duplicates arguments.models[{seen[(model, stance)]}] "
                f"({model!r} with stance {stance!r}); give each consultation of a model its own "
                "stance",
                field=field,
            )
        seen[(model, stance)] = i
        try:
            router.resolve(model, "consensus", "single", allow_fallback=False)
        except NoProviderError as exc:
            raise InvalidParams(f"{field}.model: {exc}", field=f"{field}.model") from exc
        out.append(
            Consultation(
                index=i, model=model, stance=stance, stance_prompt=item.get("stance_prompt")
            )
        )
    return out


def _user_prompt(prompt: str, files_text: str) -> str:
    return prompt if not files_text else f"{prompt}\n\n{files_text}"


async def _consult(
    c: Consultation,
    *,
    router: Any,
    share_s: float,
    history: list[dict[str, Any]],
    user: str,
    args: dict[str, Any],
    progress: StreamProgress,
    done: list[int],
    total: int,
    ctx: ToolContext,
) -> None:
    stance_text = c.stance_prompt or STANCE_PROMPTS[c.stance]
    messages = [{"role": "system", "content": f"{_SYSTEM}\n\n{stance_text}"}, *history]
    messages.append({"role": "user", "content": user})
    req = ChatRequest(
        messages=messages,
        model=c.model,
        tool="consensus",
        step="single",
        temperature=args.get("temperature"),
        thinking_mode=args.get("thinking_mode"),
        use_websearch=bool(args.get("use_websearch", False)),
        on_delta=progress.on_delta,
        allow_fallback=False,
    )
    with anyio.move_on_after(share_s) as scope:
        try:
            resp: ChatResponse = await router.complete(req)
        except DeadlineExceeded as exc:
            c.outcome, c.reason = "timed_out", exc.reason
            c.detail = f"no answer within its share of the deadline ({share_s:.3g}s)"
        except ExaiError as exc:
            c.outcome, c.reason, c.detail = "failed", exc.reason, str(exc)[:300]
            c.retry_after_s = exc.retry_after_s
        else:
            c.outcome, c.content = "answered", resp.content
            c.served_by, c.provider = resp.model, resp.provider
    if scope.cancelled_caught and c.outcome == "pending":
        c.outcome, c.reason = "timed_out", "timeout"
        c.detail = f"no answer within its share of the deadline ({share_s:.3g}s)"
    done[0] += 1
    await ctx.progress(
        progress=done[0], total=total, message=f"consensus: {c.label} {c.outcome.replace('_', ' ')}"
    )


def _synthesis_prompt(prompt: str, consultations: list[Consultation]) -> str:
    parts = [f"The question put to the models:\n{prompt}", ""]
    for c in consultations:
        parts.append(f"## {c.label}")
        if c.outcome == "answered":
            parts.append(c.content.strip())
        else:
            parts.append(f"[no answer: {c.status_line()}]")
        parts.append("")
    parts.append(
        "Synthesise these answers: (1) where the models agree, (2) where they disagree and why, "
        "(3) the strongest argument on each side, (4) a final recommendation with the "
        "confidence it deserves. Mention that the models without an answer were not heard."
    )
    return "\n".join(parts)


def _remaining(deadline: float) -> float:
    return deadline - anyio.current_time() if math.isfinite(deadline) else math.inf


async def _synthesise(
    router: Any,
    args: dict[str, Any],
    ctx: ToolContext,
    consultations: list[Consultation],
    deadline: float,
    progress: StreamProgress,
) -> tuple[ChatResponse | None, str | None]:
    left = _remaining(deadline)
    margin = min(0.5, max(0.02, left * 0.05)) if math.isfinite(left) else 0.0
    model = args.get("model") or ctx.settings.default_model or "auto"
    await ctx.progress(message="consensus: synthesising the answers")
    request = ChatRequest(
        messages=[
            {"role": "system", "content": _SYNTH_SYSTEM},
            {"role": "user", "content": _synthesis_prompt(args["prompt"], consultations)},
        ],
        model=model,
        tool="consensus",
        step="final",
        temperature=args.get("temperature"),
        thinking_mode=args.get("thinking_mode"),
        on_delta=progress.on_delta,
        # the synthesis is the call's answer: call.finished and the audit record name its route
        on_route=lambda prov, mdl: ctx.annotations.update(provider=prov, model=mdl),
    )
    outcome: tuple[ChatResponse | None, str | None] = (
        None,
        "timeout: no synthesis before the call's deadline",
    )
    with anyio.CancelScope(deadline=deadline - margin):
        try:
            outcome = (await router.complete(request), None)
        except ExaiError as exc:
            outcome = (None, f"{exc.reason}: {str(exc)[:300]}")
    return outcome


async def _consensus(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    router = ctx.services.get("providers")
    if router is None:
        raise ToolError("no provider layer is configured in this daemon")
    consultations = _consultations(args, router)

    files: list[str] = list(args.get("files") or [])
    files_text, file_notes = "", ()
    if files:
        budget = min(context_tokens(c.model) for c in consultations) // 2
        block = await file_service(ctx).read(files, token_budget=budget)
        files_text, file_notes = block.text, block.notes

    conv = ctx.services.get("conversations")
    thread, history = None, []
    if conv is not None:
        thread = await conv.start_or_continue(
            args.get("continuation_id"), "consensus", call_key=ctx.call_key, owner=ctx.client
        )
        prompt_bytes = len(str(args["prompt"]).encode("utf-8", "replace"))
        conv.check_room(thread, turns=2, sizes={"arguments.prompt": prompt_bytes})
        if args.get("continuation_id"):
            history = list(build_history(thread, HISTORY_TOKEN_BUDGET))
    elif args.get("continuation_id"):
        raise ToolError("conversations are not available in this daemon; omit continuation_id")

    deadline = anyio.current_effective_deadline()
    share = _remaining(deadline) * CONSULT_SHARE
    if share <= 0:
        raise DeadlineExceeded("no time left to consult the models")
    progress = StreamProgress(ctx, "consensus")
    done = [0]
    await ctx.progress(
        progress=0, total=len(consultations), message="consensus: consulting the models"
    )
    user = _user_prompt(args["prompt"], files_text)
    async with anyio.create_task_group() as tg:
        for c in consultations:
            tg.start_soon(
                functools.partial(
                    _consult,
                    c,
                    router=router,
                    share_s=share,
                    history=history,
                    user=user,
                    args=args,
                    progress=progress,
                    done=done,
                    total=len(consultations),
                    ctx=ctx,
                )
            )

    answered = [c for c in consultations if c.outcome == "answered"]
    if not answered:
        summary = "; ".join(f"{c.label}: {c.status_line()}" for c in consultations)
        hints = [c.retry_after_s for c in consultations if c.retry_after_s is not None]
        raise UpstreamError(
            f"none of the {len(consultations)} models answered: {summary}",
            retry_after_s=min(hints) if hints else None,
            data={"consultations": [c.to_dict() for c in consultations]},
        )

    synthesis: ChatResponse | None = None
    synth_note: str | None = None
    if len(answered) >= 2:
        synthesis, synth_note = await _synthesise(
            router, args, ctx, consultations, deadline, progress
        )
    else:
        synth_note = "only one model answered: nothing to weigh it against, so no synthesis"
    # call.finished and the audit record name what answered: the synthesis, else the one answer
    # (before, a consensus call logged provider and model null however many models it asked)
    if synthesis is not None:
        ctx.annotations.update(provider=synthesis.provider, model=synthesis.model)
    elif len(answered) == 1:
        one = answered[0]
        ctx.annotations.update(provider=one.provider, model=one.served_by or one.model)

    cont = await _save(ctx, conv, thread, args, consultations, synthesis)
    return _result(consultations, synthesis, synth_note, cont, file_notes, len(answered))


async def _save(
    ctx: ToolContext,
    conv: Any,
    thread: Any,
    args: dict[str, Any],
    consultations: list[Consultation],
    synthesis: ChatResponse | None,
) -> dict[str, Any]:
    if conv is None or thread is None:
        return {}
    from exai.storage.model import Turn

    rid = ctx.request_id if ctx.request_id is not None else uuid.uuid4()
    key = "consensus:" + (ctx.call_key or f"{ctx.session_id}:{rid}")
    answer = (
        synthesis.content
        if synthesis is not None
        else "\n\n".join(f"{c.label}: {c.content or c.status_line()}" for c in consultations)
    )
    thread = await conv.add_turns(
        thread,
        [
            Turn(
                role="user", content=args["prompt"], tool="consensus", files=args.get("files", ())
            ),
            Turn(
                role="assistant",
                content=answer,
                tool="consensus",
                provider=synthesis.provider if synthesis else "",
                model=synthesis.model if synthesis else "",
            ),
        ],
        key,
        owner=ctx.client,
    )
    return {"continuation_id": thread.id, "remaining_turns": int(conv.turns_remaining(thread))}


def _result(
    consultations: list[Consultation],
    synthesis: ChatResponse | None,
    synth_note: str | None,
    cont: dict[str, Any],
    file_notes: tuple[str, ...],
    n_answered: int,
) -> ToolResult:
    n = len(consultations)
    lines = [f"# Consensus: {n_answered} of {n} models answered", ""]
    if synthesis is not None:
        lines += ["## Synthesis", synthesis.content.strip(), ""]
    elif synth_note:
        lines += [f"(No synthesis: {synth_note}.)", ""]
    lines.append("## Each model")
    for c in consultations:
        lines.append(f"### {c.label}: {c.status_line()}")
        if c.outcome == "answered":
            lines.append(c.content.strip())
        lines.append("")
    footer = []
    if synthesis is not None:
        footer.append(f"synthesis by {synthesis.model} (provider {synthesis.provider})")
    if cont:
        footer.append(
            f"continuation_id: {cont['continuation_id']} ({cont['remaining_turns']} turns "
            "remaining)"
        )
    footer += list(file_notes)
    text = "\n".join(lines).rstrip() + ("\n\n---\n" + "\n".join(footer) if footer else "")
    structured: dict[str, Any] = {
        "status": "complete" if n_answered == n else "partial",
        "answered": n_answered,
        "consulted": n,
        "consultations": [c.to_dict() for c in consultations],
        "synthesis": (
            {"content": synthesis.content, "model": synthesis.model, "provider": synthesis.provider}
            if synthesis is not None
            else None
        ),
        **cont,
    }
    if synthesis is None and synth_note:
        key = "synthesis_skipped" if n_answered < 2 else "synthesis_error"
        structured[key] = synth_note
    if file_notes:
        structured["file_notes"] = list(file_notes)
    return ToolResult(text=text, structured=structured)


def make_consensus_tool(*, timeout_s: float | None = None) -> ToolSpec:
    """The ``consensus`` tool; ``timeout_s`` overrides ``EXAI_CALL_TIMEOUT_S`` for it."""
    check_schema(INPUT_SCHEMA)
    return ToolSpec(
        name="consensus",
        title="Consensus of several models",
        description=(
            "Consult 2–8 models at once, each with a stance (for / against / neutral, or a "
            "custom stance_prompt), then synthesise agreements, disagreements and a "
            "recommendation. A model that fails or runs out of its share of the deadline is "
            "reported next to the others' answers; the call fails only if none answered."
        ),
        input_schema=INPUT_SCHEMA,
        handler=_consensus,
        timeout_s=timeout_s,
    )


CONSENSUS = make_consensus_tool()
