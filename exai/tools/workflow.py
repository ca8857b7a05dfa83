"""The workflow engine: one handler drives every step-based tool from a declarative definition
(:mod:`exai.tools.workflow_model`: the definition and its steps; :mod:`exai.tools.workflow_render`:
what a step answers and the expert prompt).

A *workflow* tool (``thinkdeep``, ``analyze``, ``codereview``, ``debug``, ``planner``) is called
once per step by the client's agent. The agent does the work between calls (reads code, runs
tests); the server records each step and says what to do next. **The server never runs steps on
its own**: an intermediate step makes no model call, and a session makes at most one — the
*expert analysis* on its final step.

A call carries ``step``, ``step_number``, ``total_steps``, ``next_step_required``, ``findings``
and optionally ``relevant_files``/``files``, ``issues_found`` (each with a severity),
``confidence`` (:data:`CONFIDENCE_LEVELS`), ``hypothesis``, ``backtrack_from_step`` and the
tool's own fields (:attr:`WorkflowDefinition.extra_properties`).

Step state lives in the conversation thread (``ctx.services["conversations"]``): each step is a
turn of role ``user`` whose content is the step as JSON (``{"exai": "workflow_step", …}``) and
whose ``tool`` is the tool's name. Step 1 without ``continuation_id`` starts a thread, and every
answer returns its ``continuation_id``; later steps must pass it. Step 1 *with* a
``continuation_id`` starts the workflow on an existing conversation (``chat`` → ``codereview``),
whose earlier turns then go with the expert prompt. A step is stored under the idempotency key
``"<tool>:<thread>:<step_number>:<hash of the step>"``: the same step sent twice is stored once,
while a corrected step, a backtrack or a revision (different content) is stored as a new turn.

The *session* of a tool in a thread is its steps since the last ``step_number == 1``. Of those,
the *active* steps are what the final prompt is built from: a step with ``backtrack_from_step=k``
discards the earlier steps numbered ``k`` or more, and a step sent again with the same number
replaces the earlier one (planner has its own rules: revisions and branches, see
:mod:`exai.tools.workflows`).

On the final step (``next_step_required=false``) the engine builds **one** prompt holding every
active step's findings, issues, hypothesis and confidence plus the contents of every relevant
file (through the file sandbox, fitted to the model's token budget), and makes exactly one
``router.complete(…, step="final")`` — ``auto`` routing then picks a quality model — unless the
confidence is ``certain`` or the definition never calls a model. The answer is stored as an
``assistant`` turn of the thread, so any tool can continue from it.

Error handling:
    No conversation service: :class:`~exai.errors.ToolError` (multi-step tools need the store;
    the daemon always has one, SQLite by default). A step after the first without
    ``continuation_id``, a ``backtrack_from_step`` not before the step, or a thread without this
    tool's step 1: :class:`~exai.errors.InvalidParams` naming the field. A refused file:
    :class:`~exai.errors.FileAccessError` naming ``arguments.relevant_files[i]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from exai.errors import InvalidParams, ToolError
from exai.providers.types import ChatRequest, ChatResponse
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from exai.tools.history import build_history
from exai.tools.progress import StreamProgress
from exai.tools.sandbox import MAX_PATHS, FileSandbox, context_tokens
from exai.tools.schema import check_schema
from exai.tools.workflow_model import (
    CONFIDENCE_LEVELS,
    SEVERITIES,
    STEP_MARKER,
    WorkflowDefinition,
    active_steps,
    canonical,
    record,
    session_steps,
    step_files,
    without_session,
)
from exai.tools.workflow_render import (
    all_files,
    all_issues,
    expert_prompt,
    intermediate_result,
    issue_counts,
    plural,
)

__all__ = [
    "CONFIDENCE_LEVELS",
    "FILES_CONTEXT_SHARE",
    "HISTORY_TOKEN_BUDGET",
    "SEVERITIES",
    "STEP_MARKER",
    "WorkflowDefinition",
    "active_steps",
    "file_service",
    "make_workflow_tool",
    "run_step",
    "session_steps",
]

#: Tokens of earlier (non-step) turns of the thread sent with the expert prompt.
HISTORY_TOKEN_BUDGET = 24_000
#: Share of the model's context window the files of the expert prompt may take.
FILES_CONTEXT_SHARE = 0.5


def file_service(ctx: ToolContext) -> Any:
    """The daemon's file sandbox, or one built from the call's settings."""
    files = ctx.services.get("files")
    return files if files is not None else FileSandbox(ctx.settings)


def _conversations(ctx: ToolContext, tool: str) -> Any:
    conv = ctx.services.get("conversations")
    if conv is None:
        raise ToolError(
            f"{tool} is a multi-step tool and needs the conversation store to keep its steps; "
            "this daemon runs without one (check EXAI_STORAGE_URL; SQLite is the default)"
        )
    return conv


def _check_step(defn: WorkflowDefinition, args: Mapping[str, Any]) -> None:
    n = args["step_number"]
    if n > 1 and not args.get("continuation_id"):
        raise InvalidParams(
            f"arguments.continuation_id: step {n} continues a {defn.name} session; pass the "
            "continuation_id returned by step 1",
            field="arguments.continuation_id",
        )
    back = args.get("backtrack_from_step")
    if back is not None and back >= n:
        raise InvalidParams(
            f"arguments.backtrack_from_step: must name an earlier step than {n} (got {back})",
            field="arguments.backtrack_from_step",
        )
    if defn.check_step is not None:
        defn.check_step(args)


async def run_step(defn: WorkflowDefinition, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    """Record one step of ``defn``'s workflow; on the final step, finish it."""
    conv = _conversations(ctx, defn.name)
    _check_step(defn, args)
    step_number: int = args["step_number"]
    total_steps = max(int(args["total_steps"]), step_number)
    new_files = step_files(args)
    sandbox = file_service(ctx) if new_files else None
    if sandbox is not None:
        # refuse a bad path now, at the step that names it, not at the final step
        for key in ("relevant_files", "files"):
            if args.get(key):
                await sandbox.check(list(args[key]), field=f"arguments.{key}")

    cid = args.get("continuation_id")
    thread = await conv.start_or_continue(cid, defn.name, call_key=ctx.call_key, owner=ctx.client)
    earlier = session_steps(thread, defn.name)
    if step_number > 1 and not earlier:
        raise InvalidParams(
            f"arguments.step_number: conversation {thread.id} has no {defn.name} step 1; "
            "start the session with step_number 1",
            field="arguments.step_number",
        )
    if defn.check_session is not None:
        defn.check_session(earlier, args)

    from exai.storage.model import Turn

    rec = record(defn, args, total_steps)
    content = canonical(rec)
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    # the call's exactly-once key: a retried call writes its step once, while the same step
    # sent again by the agent (a new session, a reverted correction) is a new turn
    key = (
        f"{defn.name}:{ctx.call_key}"
        if ctx.call_key
        else f"{defn.name}:{thread.id}:{step_number}:{digest}"
    )
    repeated = step_number > 1 and bool(earlier) and canonical(earlier[-1]) == content
    # every limit before any upstream call: this step's turn, and the expert's answer to come
    expert = (
        not rec["next_step_required"]
        and defn.calls_model
        and not (defn.skip_expert_when_certain and rec.get("confidence") == "certain")
    )
    conv.check_room(
        thread,
        turns=(0 if repeated else 1) + (1 if expert else 0),
        sizes={} if repeated else _field_sizes(rec),
    )
    if not repeated:
        # (the same step sent again right away changes nothing: it is not stored twice)
        thread = await conv.add_turn(
            thread,
            Turn(role="user", content=content, tool=defn.name, files=new_files),
            key,
            owner=ctx.client,
        )
    steps = session_steps(thread, defn.name)
    active = (defn.active or active_steps)(steps)
    remaining = int(conv.turns_remaining(thread))
    base: dict[str, Any] = {
        "tool": defn.name,
        "step_number": step_number,
        "total_steps": total_steps,
        "continuation_id": thread.id,
        "remaining_turns": remaining,
        "steps_recorded": len(active),
    }
    if rec["next_step_required"]:
        return intermediate_result(
            defn, rec, active, base, raised=total_steps != args["total_steps"]
        )
    return await _final(defn, args, rec, active, base, thread, key, conv, ctx)


def _field_sizes(rec: Mapping[str, Any]) -> dict[str, int]:
    """Bytes each argument adds to the stored step (what ``check_room`` names when too big)."""
    return {
        f"arguments.{k}": len(json.dumps(v, ensure_ascii=False).encode("utf-8", "replace"))
        for k, v in rec.items()
    }


async def _final(
    defn: WorkflowDefinition,
    args: Mapping[str, Any],
    rec: Mapping[str, Any],
    active: Sequence[dict[str, Any]],
    base: dict[str, Any],
    thread: Any,
    key: str,
    conv: Any,
    ctx: ToolContext,
) -> ToolResult:
    footer_cont = (
        f"continuation_id: {base['continuation_id']} ({base['remaining_turns']} turns remaining)"
    )
    if not defn.calls_model:
        assert defn.render_final is not None
        text, extra = defn.render_final(active)
        structured = {"status": "complete", **base, "next_step_required": False, **extra}
        return ToolResult(text=text + "\n\n---\n" + footer_cont, structured=structured)

    issues = all_issues(active)
    files = all_files(active, args)
    summary: dict[str, Any] = {
        "status": "complete",
        **base,
        "next_step_required": False,
        "issues_found": issues,
        "issues_by_severity": issue_counts(active),
        "relevant_files": files,
        "confidence": rec.get("confidence"),
        "hypothesis": next(
            (r["hypothesis"] for r in reversed(active) if r.get("hypothesis")), None
        ),
    }
    counts = ", ".join(f"{n} {s}" for s, n in summary["issues_by_severity"].items() if n)
    head = (
        f"{defn.name} complete: {plural(len(active), 'step')}, {plural(len(issues), 'issue')}"
        + (f" ({counts})" if counts else "")
        + (f", confidence {rec['confidence']}" if rec.get("confidence") else "")
        + "."
    )
    if defn.skip_expert_when_certain and rec.get("confidence") == "certain":
        summary["expert_analysis"] = None
        summary["expert_skipped"] = "confidence is certain"
        text = "\n".join(
            [
                head,
                "Expert analysis skipped: the agent is certain. Act on the findings:",
                *(f"- [{i['severity']}] {i['description']}" for i in issues),
                "",
                "---",
                footer_cont,
            ]
        )
        return ToolResult(text=text, structured=summary)

    router = ctx.services.get("providers")
    if router is None:
        raise ToolError("no provider layer is configured in this daemon")
    model = args.get("model") or ctx.settings.default_model or "auto"
    files_text, file_notes = "", ()
    if files:
        sandbox = file_service(ctx)
        budget = int(context_tokens(model) * FILES_CONTEXT_SHARE)
        # every path was vetted at the step that named it; a refusal now means the file
        # system changed since (a swapped symlink), and the index is into the session's list
        # a long session may have named more files than one read takes: the latest ones
        to_read = files[-MAX_PATHS:]
        block = await sandbox.read(to_read, token_budget=budget, field="session.relevant_files")
        files_text, file_notes = block.text, block.notes
        if len(to_read) < len(files):
            dropped = len(files) - len(to_read)
            file_notes = (
                f"{dropped} files named in earlier steps not read: at most {MAX_PATHS} per call",
                *file_notes,
            )
    history_thread = without_session(thread, defn.name, session_steps(thread, defn.name))
    history = list(build_history(history_thread, HISTORY_TOKEN_BUDGET))
    prompt = expert_prompt(defn, active, files_text)
    messages: list[dict[str, Any]] = []
    if defn.system_prompt:
        messages.append({"role": "system", "content": defn.system_prompt})
    messages += [*history, {"role": "user", "content": prompt}]
    progress = StreamProgress(ctx, f"{defn.name} expert analysis")
    await ctx.progress(progress=0, message=f"{defn.name}: asking a model for the expert analysis")
    resp: ChatResponse = await router.complete(
        ChatRequest(
            messages=messages,
            model=model,
            tool=defn.name,
            step=defn.expert_step,
            temperature=args.get("temperature"),
            thinking_mode=args.get("thinking_mode") or defn.default_thinking_mode,
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

    from exai.storage.model import Turn

    thread = await conv.add_turn(
        thread,
        Turn(
            role="assistant",
            content=resp.content,
            tool=defn.name,
            provider=resp.provider,
            model=resp.model,
        ),
        key + ":expert",
        owner=ctx.client,
    )
    remaining = int(conv.turns_remaining(thread))
    summary["remaining_turns"] = remaining
    summary["expert_analysis"] = {
        "content": resp.content,
        "model": resp.model,
        "provider": resp.provider,
        "usage": resp.usage.to_dict(),
        "attempts": [a.to_dict() for a in resp.attempts],
    }
    if file_notes:
        summary["file_notes"] = list(file_notes)
    footer = [
        head,
        f"expert analysis by {resp.model} (provider {resp.provider})",
        f"continuation_id: {thread.id} ({remaining} turns remaining)",
        *file_notes,
    ]
    text = resp.content.rstrip() + "\n\n---\n" + "\n".join(footer)
    return ToolResult(text=text, structured=summary)


def make_workflow_tool(defn: WorkflowDefinition) -> ToolSpec:
    """The :class:`~exai.tools.base.ToolSpec` serving ``defn``'s workflow.

    Raises:
        SchemaError: the definition's schema uses something the validator does not support.
    """
    schema = defn.input_schema()
    check_schema(schema)

    async def handler(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return await run_step(defn, args, ctx)

    return ToolSpec(
        name=defn.name,
        title=defn.title or None,
        description=defn.description,
        input_schema=schema,
        handler=handler,
        timeout_s=defn.timeout_s,
    )
