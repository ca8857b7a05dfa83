"""What a workflow is: its definition (:class:`WorkflowDefinition`), the schema every
workflow tool shares, and its steps as they are stored in the conversation thread (each a
``user`` turn whose content is the step as JSON, marked :data:`STEP_MARKER`).

The engine that drives a step is :mod:`exai.tools.workflow`; what a step answers and the expert
prompt are rendered by :mod:`exai.tools.workflow_render`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from exai.providers.types import THINKING_MODES, Step
from exai.tools.sandbox import MAX_PATHS

__all__ = [
    "COMMON_PROPERTIES",
    "CONFIDENCE_LEVELS",
    "SEVERITIES",
    "STEP_MARKER",
    "WorkflowDefinition",
    "active_steps",
    "canonical",
    "parse_step",
    "record",
    "session_steps",
    "step_files",
    "without_session",
]

#: How sure the agent is, from least to most; ``certain`` skips the expert analysis.
CONFIDENCE_LEVELS = ("exploring", "low", "medium", "high", "very_high", "almost_certain", "certain")
#: Severities of ``issues_found``, most severe first.
SEVERITIES = ("critical", "high", "medium", "low")
#: The ``exai`` value that marks a stored turn as a workflow step.
STEP_MARKER = "workflow_step"

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


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record(defn: WorkflowDefinition, args: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"exai": STEP_MARKER, "tool": defn.name}
    for key, value in args.items():
        if key not in _CALL_OPTIONS:
            rec[key] = value
    rec["total_steps"] = total_steps
    return rec


def parse_step(turn: Any, tool: str) -> dict[str, Any] | None:
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
        rec = parse_step(turn, tool)
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


def without_session(thread: Any, tool: str, session: Sequence[dict[str, Any]]) -> Any:
    """``thread`` without this session's step turns: what the expert gets as history
    (earlier chat turns, earlier answers of any tool)."""
    turns = list(getattr(thread, "turns", ()) or ())
    step_idx = [i for i, t in enumerate(turns) if parse_step(t, tool) is not None]
    # the session is the tail of this tool's step turns
    drop = set(step_idx[len(step_idx) - len(session) :]) if session else set()
    return attrs.evolve(thread, turns=[t for i, t in enumerate(turns) if i not in drop])


def step_files(rec: Mapping[str, Any]) -> list[str]:
    return [*(rec.get("relevant_files") or ()), *(rec.get("files") or ())]
