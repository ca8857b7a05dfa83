"""The workflow engine: one handler drives every step-based tool from a declarative definition.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from exai.errors import InvalidParams, ToolError
from exai.providers.types import THINKING_MODES, ChatRequest, ChatResponse, Step
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from exai.tools.history import build_history
from exai.tools.progress import StreamProgress
from exai.tools.sandbox import MAX_PATHS, FileSandbox, context_tokens
from exai.tools.schema import check_schema

__all__ = [
    "CONFIDENCE_LEVELS",
    "HISTORY_TOKEN_BUDGET",
    "SEVERITIES",
    "STEP_MARKER",
    "WorkflowDefinition",
    "active_steps",
    "file_service",
    "make_workflow_tool",
    "session_steps",
]

#: How sure the agent is, from least to most; ``certain`` skips the expert analysis.
CONFIDENCE_LEVELS = ("exploring", "low", "medium", "high", "very_high", "almost_certain", "certain")
#: Severities of ``issues_found``, most severe first.
SEVERITIES = ("critical", "high", "medium", "low")
#: The ``exai`` value that marks a stored turn as a workflow step.
STEP_MARKER = "workflow_step"
#: Tokens of earlier (non-step) turns of the thread sent with the expert prompt.
HISTORY_TOKEN_BUDGET = 24_000
#: Share of the model's context window the files of the expert prompt may take.
FILES_CONTEXT_SHARE = 0.5
#: Shortest interval between two progress notifications while the expert answer streams.

# Call options: they shape the model call, not the step, so they are not stored in it.
_CALL_OPTIONS = frozenset({"continuation_id", "model", "temperature", "thinking_mode",
                           "use_websearch"})  # fmt: skip

_FILES = {"type": "array", "items": {"type": "string", "pattern": "^/"}, "maxItems": MAX_PATHS}

COMMON_PROPERTIES: dict[str, dict[str, Any]] = {
    "step": {
        "type": "string",
        "minLength": 1,
        "description": "what you are doing in this step (step 1: the task and your plan)",
    },
    "step_number": {"type": "integer", "minimum": 1, "description": "1 for the first step"},
    "total_steps": {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "description": "your current estimate of the steps needed (may change)",
    },
    "next_step_required": {
        "type": "boolean",
        "description": "true while more steps follow; false on the final step",
    },
    "findings": {"type": "string", "description": "what this step found, concretely"},
    "relevant_files": {
        **_FILES,
        "description": "absolute paths of the files that matter (their contents go to the "
        "expert analysis)",
    },
    "files": {**_FILES, "description": "absolute paths of more files to include"},
    "issues_found": {
        "type": "array",
        "maxItems": 200,
        "items": {
            "type": "object",
            "properties": {
                "severity": {"type": "string", "enum": list(SEVERITIES)},
                "description": {"type": "string", "minLength": 1},
                "location": {"type": "string", "description": "file:line or symbol"},
            },
            "required": ["severity", "description"],
            "additionalProperties": False,
        },
        "description": "issues found so far, each with a severity",
    },
    "confidence": {
        "type": "string",
        "enum": list(CONFIDENCE_LEVELS),
        "description": "how sure you are; 'certain' on the final step skips the expert analysis",
    },
    "hypothesis": {"type": "string", "description": "your current theory"},
    "backtrack_from_step": {
        "type": "integer",
        "minimum": 1,
        "description": "discard the steps from this number on and continue from here",
    },
    "continuation_id": {
        "type": "string",
        "minLength": 1,
        "description": "the id returned by step 1 (required from step 2 on); on step 1, "
        "continue an earlier conversation",
    },
    "model": {"type": "string", "description": "model for the expert analysis, or 'auto'"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "thinking_mode": {"type": "string", "enum": list(THINKING_MODES)},
    "use_websearch": {"type": "boolean", "default": False},
}
_REQUIRED = ("step", "step_number", "total_steps", "next_step_required", "findings")


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class WorkflowDefinition:
    """Everything that makes one workflow tool different from another.

    Attributes:
        name: the tool's name.
        title: a short human title.
        description: what ``tools/list`` says about the tool.
        extra_properties: JSON Schema properties of the tool's own fields.
        extra_required: which of them are required.
        omit_fields: common fields the tool does not take (planner takes no files or model).
        findings_required: whether ``findings`` is required.
        system_prompt: the expert model's system prompt.
        expert_prompt: the expert's instructions; ``str.format_map`` over the tool's own fields
            as last given in the session (a field never given reads as its schema ``default``,
            else "not specified") plus ``tool``. The engine appends the gathered evidence.
        first_step_guidance: what to do after step 1.
        step_guidance: what to do after a later intermediate step.
        calls_model: False for tools that never call a model (planner).
        expert_step: the ``step`` of the expert call (``"final"``: auto routing picks quality).
        skip_expert_when_certain: ``confidence: certain`` on the final step skips the call.
        default_thinking_mode: used for the expert call when the step names none.
        check_step: static checks of one step's arguments (raise ``InvalidParams``).
        check_session: checks of a step against the session's earlier steps.
        active: the session's active steps (default :func:`active_steps`).
        render_final: for tools that never call a model, the final answer's text and
            structured content from the active steps.
        render_progress: extra structured content of an intermediate answer.
        timeout_s: the tool's deadline (``None``: ``EXAI_CALL_TIMEOUT_S``).
    """

    name: str
    title: str = ""
    description: str
    extra_properties: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    extra_required: tuple[str, ...] = ()
    omit_fields: frozenset[str] = frozenset()
    findings_required: bool = True
    system_prompt: str = ""
    expert_prompt: str = ""
    first_step_guidance: str = ""
    step_guidance: str = ""
    calls_model: bool = True
    expert_step: Step = "final"
    skip_expert_when_certain: bool = True
    default_thinking_mode: str | None = None
    check_step: Callable[[Mapping[str, Any]], None] | None = None
    check_session: Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], None] | None = None
    active: Callable[[Sequence[dict[str, Any]]], list[dict[str, Any]]] | None = None
    render_final: Callable[[Sequence[dict[str, Any]]], tuple[str, dict[str, Any]]] | None = None
    render_progress: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] | None = None
    timeout_s: float | None = None

    def input_schema(self) -> dict[str, Any]:
        """The tool's JSON Schema: the common fields (minus omitted ones) and its own."""
        props = {k: v for k, v in COMMON_PROPERTIES.items() if k not in self.omit_fields}
        props.update(self.extra_properties)
        required = [r for r in _REQUIRED if r in props]
        if not self.findings_required:
            required.remove("findings")
        required += [r for r in self.extra_required if r not in required]
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }

    def own_fields(self) -> tuple[str, ...]:
        return tuple(self.extra_properties)


# --------------------------------------------------------------------------------------------
# Steps in the thread


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _record(defn: WorkflowDefinition, args: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"exai": STEP_MARKER, "tool": defn.name}
    for key, value in args.items():
        if key not in _CALL_OPTIONS:
            rec[key] = value
    rec["total_steps"] = total_steps
    return rec


def _parse_step(turn: Any, tool: str) -> dict[str, Any] | None:
    if getattr(turn, "role", "") != "user" or getattr(turn, "tool", "") != tool:
        return None
    content = getattr(turn, "content", "")
    if not content.startswith("{"):
        return None
    try:
        rec = json.loads(content)
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("exai") != STEP_MARKER or rec.get("tool") != tool:
        return None
    if not isinstance(rec.get("step_number"), int):
        return None
    return rec


def session_steps(thread: Any, tool: str) -> list[dict[str, Any]]:
    """``tool``'s steps in ``thread`` since its last step 1, oldest first."""
    steps: list[dict[str, Any]] = []
    for turn in getattr(thread, "turns", ()) or ():
        rec = _parse_step(turn, tool)
        if rec is None:
            continue
        if rec["step_number"] == 1:
            steps = []
        steps.append(rec)
    return steps


def active_steps(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps the final prompt is built from.

    ``backtrack_from_step=k`` discards the earlier steps numbered ``k`` or more; a step sent
    again with the same number replaces the earlier one. The result is in step order.
    """
    out: list[dict[str, Any]] = []
    for rec in steps:
        back = rec.get("backtrack_from_step")
        if isinstance(back, int):
            out = [s for s in out if s["step_number"] < back]
        out = [s for s in out if s["step_number"] != rec["step_number"]]
        out.append(rec)
    return sorted(out, key=lambda s: s["step_number"])


def _without_session(thread: Any, tool: str, session: Sequence[dict[str, Any]]) -> Any:
    """``thread`` without this session's step turns: what the expert gets as history
    (earlier chat turns, earlier answers of any tool)."""
    turns = list(getattr(thread, "turns", ()) or ())
    step_idx = [i for i, t in enumerate(turns) if _parse_step(t, tool) is not None]
    # the session is the tail of this tool's step turns
    drop = set(step_idx[len(step_idx) - len(session) :]) if session else set()
    return attrs.evolve(thread, turns=[t for i, t in enumerate(turns) if i not in drop])


# --------------------------------------------------------------------------------------------
# Services


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


def _step_files(rec: Mapping[str, Any]) -> list[str]:
    return [*(rec.get("relevant_files") or ()), *(rec.get("files") or ())]


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
    new_files = _step_files(args)
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

    rec = _record(defn, args, total_steps)
    content = _canonical(rec)
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    # the call's exactly-once key: a retried call writes its step once, while the same step
    # sent again by the agent (a new session, a reverted correction) is a new turn
    key = (
        f"{defn.name}:{ctx.call_key}"
        if ctx.call_key
        else f"{defn.name}:{thread.id}:{step_number}:{digest}"
    )
    repeated = step_number > 1 and bool(earlier) and _canonical(earlier[-1]) == content
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
        return _intermediate(defn, rec, active, base, raised=total_steps != args["total_steps"])
    return await _final(defn, args, rec, active, base, thread, key, conv, ctx)


def _field_sizes(rec: Mapping[str, Any]) -> dict[str, int]:
    """Bytes each argument adds to the stored step (what ``check_room`` names when too big)."""
    return {
        f"arguments.{k}": len(json.dumps(v, ensure_ascii=False).encode("utf-8", "replace"))
        for k, v in rec.items()
    }


def _next_guidance(defn: WorkflowDefinition, rec: Mapping[str, Any]) -> str:
    n = rec["step_number"]
    guidance = defn.first_step_guidance if n == 1 else defn.step_guidance
    guidance = guidance or defn.step_guidance or "Continue the investigation."
    conf = rec.get("confidence")
    if defn.calls_model and conf in ("very_high", "almost_certain"):
        guidance += (
            " You are nearly sure: confirm the remaining doubt, then finish with "
            "next_step_required=false."
        )
    return guidance


def _intermediate(
    defn: WorkflowDefinition,
    rec: Mapping[str, Any],
    active: Sequence[dict[str, Any]],
    base: dict[str, Any],
    *,
    raised: bool,
) -> ToolResult:
    n, total, cid = rec["step_number"], base["total_steps"], base["continuation_id"]
    guidance = _next_guidance(defn, rec)
    last = n + 1 >= total
    call = (
        f"Then call {defn.name} again with step_number={n + 1}, total_steps={total}, "
        f'next_step_required={"false" if last else "true"}, continuation_id="{cid}"'
    )
    if defn.calls_model:
        call += (
            ", your findings, relevant_files, issues_found and confidence. On the final step "
            "(next_step_required=false) the server asks a model once for an expert analysis of "
            "everything gathered, unless confidence is 'certain'."
        )
    else:
        call += "."
    lines = [f"{defn.name}: step {n} of {total} recorded."]
    back = rec.get("backtrack_from_step")
    if back:
        lines.append(f"Backtracked: steps {back}–{n - 1} are discarded.")
    if raised:
        lines.append(f"total_steps raised to {total} (step_number was beyond it).")
    lines += [f"Next: {guidance}", call, f"({base['remaining_turns']} turns remaining)"]
    structured: dict[str, Any] = {
        "status": "pause_for_investigation" if defn.calls_model else "planning",
        **base,
        "next_step_required": True,
        "next_step": {
            "step_number": n + 1,
            "total_steps": total,
            "guidance": guidance,
            "continuation_id": cid,
        },
    }
    if defn.calls_model:
        structured["issues_by_severity"] = _issue_counts(active)
        if rec.get("confidence"):
            structured["confidence"] = rec["confidence"]
    if defn.render_progress is not None:
        structured.update(defn.render_progress(active))
    return ToolResult(text="\n".join(lines), structured=structured)


def _all_issues(active: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for rec in active:
        for issue in rec.get("issues_found") or ():
            k = _canonical(issue)
            if k not in seen:
                seen.add(k)
                out.append(dict(issue))
    out.sort(key=lambda i: SEVERITIES.index(i.get("severity", "low")))
    return out


def _issue_counts(active: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(SEVERITIES, 0)
    for issue in _all_issues(active):
        counts[issue["severity"]] += 1
    return counts


def _all_files(active: Sequence[Mapping[str, Any]], args: Mapping[str, Any]) -> list[str]:
    files: list[str] = []
    for rec in [*active, args]:
        files.extend(_step_files(rec))
    return list(dict.fromkeys(files))


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "not specified"


def _render_value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) or "none"
    return str(v)


def _expert_prompt(
    defn: WorkflowDefinition, active: Sequence[Mapping[str, Any]], files_text: str
) -> str:
    fields = _Fields(tool=defn.name)
    for key, schema in defn.extra_properties.items():
        if "default" in schema:
            fields[key] = _render_value(schema["default"])
    for rec in active:
        for key in defn.own_fields():
            if rec.get(key) is not None:
                fields[key] = _render_value(rec[key])
    out = [defn.expert_prompt.format_map(fields).strip(), ""]
    out.append(f"## The agent's {defn.name} session: {len(active)} steps")
    for rec in active:
        out.append(f"\n### Step {rec['step_number']} of {rec['total_steps']}: {rec['step']}")
        if rec.get("findings"):
            out.append(f"Findings: {rec['findings']}")
        if rec.get("hypothesis"):
            out.append(f"Hypothesis: {rec['hypothesis']}")
        if rec.get("confidence"):
            out.append(f"Confidence: {rec['confidence']}")
        if _step_files(rec):
            out.append("Files: " + ", ".join(_step_files(rec)))
        for issue in rec.get("issues_found") or ():
            where = f" ({issue['location']})" if issue.get("location") else ""
            out.append(f"- issue [{issue['severity']}] {issue['description']}{where}")
    issues = _all_issues(active)
    last = active[-1] if active else {}
    out.append("\n## Summary of the evidence")
    out.append(
        "Issues found: "
        + (
            "; ".join(f"[{i['severity']}] {i['description']}" for i in issues)
            if issues
            else "none reported"
        )
    )
    hyp = next((r["hypothesis"] for r in reversed(active) if r.get("hypothesis")), None)
    if hyp:
        out.append(f"Current hypothesis: {hyp}")
    if last.get("confidence"):
        out.append(f"The agent's confidence: {last['confidence']}")
    if files_text:
        out.append("\n## Relevant files\n")
        out.append(files_text)
    return "\n".join(out)


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

    issues = _all_issues(active)
    files = _all_files(active, args)
    summary: dict[str, Any] = {
        "status": "complete",
        **base,
        "next_step_required": False,
        "issues_found": issues,
        "issues_by_severity": _issue_counts(active),
        "relevant_files": files,
        "confidence": rec.get("confidence"),
        "hypothesis": next(
            (r["hypothesis"] for r in reversed(active) if r.get("hypothesis")), None
        ),
    }
    counts = ", ".join(f"{n} {s}" for s, n in summary["issues_by_severity"].items() if n)
    head = (
        f"{defn.name} complete: {len(active)} steps, {len(issues)} issues"
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
    history_thread = _without_session(thread, defn.name, session_steps(thread, defn.name))
    history = list(build_history(history_thread, HISTORY_TOKEN_BUDGET))
    prompt = _expert_prompt(defn, active, files_text)
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
