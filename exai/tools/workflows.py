"""The workflow tools: ``thinkdeep``, ``analyze``, ``codereview``, ``debug`` and ``planner``.

Each is a :class:`~exai.tools.workflow.WorkflowDefinition` driven by the one engine in
:mod:`exai.tools.workflow`. :func:`register_suite` registers them together with ``consensus``
and ``challenge``.

``planner`` never calls a model. Its steps form a plan with **revisions** (``is_step_revision``
+ ``revises_step_number``: the step's text replaces the revised step's, which is marked) and
**branches** (``is_branch_point`` + ``branch_from_step`` + ``branch_id`` starts a branch forking
after that step; later steps with the same ``branch_id`` continue it). The final step returns
the whole plan, branches shown at their fork points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from exai.errors import InvalidParams
from exai.tools.base import ToolRegistry, ToolSpec
from exai.tools.workflow import WorkflowDefinition, make_workflow_tool
from exai.tools.workflow_render import plural

__all__ = [
    "ANALYZE",
    "CODEREVIEW",
    "DEBUG",
    "DEFINITIONS",
    "PLANNER",
    "THINKDEEP",
    "build_plan",
    "register_suite",
    "suite_tools",
]

_EXPERT_SYSTEM = (
    "You are a senior software engineer asked for an expert second opinion on an AI coding "
    "agent's work. The agent did the investigation step by step; its steps, findings, issues "
    "and the relevant files follow. Verify the evidence against the files, point out what is "
    "wrong or missing, and give concrete, prioritised recommendations (file:line where you "
    "can). Be direct; say when the evidence is insufficient."
)

THINKDEEP = WorkflowDefinition(
    name="thinkdeep",
    title="Think deeper",
    description=(
        "Extended reasoning on a hard problem, step by step: you investigate and record "
        "findings at each step; on the final step a quality model challenges and extends your "
        "reasoning (skipped when confidence is 'certain'). Start with step_number=1; pass the "
        "returned continuation_id on every later step."
    ),
    extra_properties={
        "problem_context": {
            "type": "string",
            "description": "background the expert needs: constraints, what was tried",
        },
        "focus_areas": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "maxItems": 20,
            "description": "aspects to concentrate on (architecture, performance, security …)",
        },
    },
    system_prompt=_EXPERT_SYSTEM,
    expert_prompt=(
        "Think deeply about the problem the agent worked on and give a second opinion.\n"
        "Problem context: {problem_context}\n"
        "Focus areas: {focus_areas}\n"
        "Check the reasoning for gaps and wrong assumptions, weigh alternatives and risks, and "
        "end with a concrete recommendation."
    ),
    first_step_guidance=(
        "State the problem precisely, list your assumptions and the questions to answer; then "
        "investigate the most uncertain one in the code or docs."
    ),
    step_guidance=(
        "Test your current reasoning against evidence (code, docs, measurements); record what "
        "held and what did not; look for alternatives you have not considered."
    ),
    default_thinking_mode="high",
)

ANALYZE = WorkflowDefinition(
    name="analyze",
    title="Analyze code",
    description=(
        "Code and architecture analysis, step by step: you examine the code and record findings "
        "and relevant_files at each step; on the final step a model gives an expert analysis "
        "of everything gathered (skipped when confidence is 'certain')."
    ),
    extra_properties={
        "analysis_type": {
            "type": "string",
            "enum": ["architecture", "performance", "security", "quality", "general"],
            "default": "general",
            "description": "what kind of analysis",
        },
    },
    system_prompt=_EXPERT_SYSTEM,
    expert_prompt=(
        "Give an expert {analysis_type} analysis of the code the agent examined: strengths, "
        "weaknesses, risks, and the changes that would matter most, in priority order."
    ),
    first_step_guidance=(
        "Map the code: entry points, main modules and their dependencies; list the files that "
        "matter in relevant_files."
    ),
    step_guidance=(
        "Examine the next area in depth (data flow, error handling, hot paths, coupling); "
        "record concrete findings with file:line and add the files to relevant_files."
    ),
)

CODEREVIEW = WorkflowDefinition(
    name="codereview",
    title="Code review",
    description=(
        "Systematic code review, step by step: you read the code and record findings, "
        "relevant_files and issues_found (with severity) at each step; on the final step a "
        "model reviews everything gathered (skipped when confidence is 'certain')."
    ),
    extra_properties={
        "review_type": {
            "type": "string",
            "enum": ["full", "security", "performance", "quick"],
            "default": "full",
        },
        "focus_on": {"type": "string", "description": "what to look at especially"},
        "standards": {"type": "string", "description": "coding standards to enforce"},
        "severity_filter": {
            "type": "string",
            "enum": ["critical", "high", "medium", "low", "all"],
            "default": "all",
            "description": "report only issues at or above this severity",
        },
    },
    system_prompt=_EXPERT_SYSTEM,
    expert_prompt=(
        "Do a {review_type} code review of the files below, building on the agent's steps.\n"
        "Focus on: {focus_on}\n"
        "Standards to enforce: {standards}\n"
        "Severity filter: {severity_filter} (report only issues at or above it).\n"
        "Confirm or reject each issue the agent found, add the ones it missed, and list them "
        "by severity (critical, high, medium, low) with file:line and a concrete fix."
    ),
    first_step_guidance=(
        "Read the code under review and state what it is for; list the files in "
        "relevant_files; note first issues_found with their severity."
    ),
    step_guidance=(
        "Review the next concern (correctness, security, performance, error handling, tests); "
        "add every issue with its severity and location to issues_found."
    ),
)

DEBUG = WorkflowDefinition(
    name="debug",
    title="Debug",
    description=(
        "Root-cause investigation around a hypothesis, step by step: you reproduce, trace and "
        "test your hypothesis, recording findings at each step; on the final step a model "
        "checks the root cause and the fix (skipped when confidence is 'certain')."
    ),
    system_prompt=_EXPERT_SYSTEM,
    expert_prompt=(
        "The agent has been debugging. Judge its hypothesis against the evidence and the code: "
        "is it the root cause, or a symptom? Name the root cause, the minimal fix (with "
        "file:line), and how to verify it; list other causes worth ruling out."
    ),
    first_step_guidance=(
        "Describe the symptom exactly and how to reproduce it; find the code paths involved; "
        "state a first hypothesis."
    ),
    step_guidance=(
        "Trace the code path behind the symptom and test your hypothesis against it (logs, a "
        "failing test, reading the code); record what you ruled out and update hypothesis and "
        "confidence."
    ),
)


# --------------------------------------------------------------------------------------------
# planner


def _check_planner_step(args: Mapping[str, Any]) -> None:
    n = args["step_number"]
    if args.get("is_step_revision"):
        rev = args.get("revises_step_number")
        if rev is None:
            raise InvalidParams(
                "arguments.revises_step_number: required when is_step_revision is true",
                field="arguments.revises_step_number",
            )
        if rev >= n:
            raise InvalidParams(
                f"arguments.revises_step_number: must name an earlier step than {n} (got {rev})",
                field="arguments.revises_step_number",
            )
    if args.get("is_branch_point"):
        for name in ("branch_from_step", "branch_id"):
            if args.get(name) is None:
                raise InvalidParams(
                    f"arguments.{name}: required when is_branch_point is true",
                    field=f"arguments.{name}",
                )
        if args["branch_from_step"] >= n:
            raise InvalidParams(
                f"arguments.branch_from_step: must name an earlier step than {n} "
                f"(got {args['branch_from_step']})",
                field="arguments.branch_from_step",
            )


def build_plan(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The plan a planner session's steps describe.

    Returns ``{"main": [entry…], "branches": {id: {"from_step": k, "steps": [entry…]}}}``;
    an entry is ``{"step_number", "step", "revised_in": [numbers of revising steps]}``, in step
    order. A step sent again with the same number (in the same branch) replaces the earlier one.

    Raises:
        InvalidParams: a revision of a step that is not in the plan, a branch from a step that
            is not on the main line, or a step of a branch that was never started.
    """
    main: dict[int, dict[str, Any]] = {}
    branches: dict[str, dict[str, Any]] = {}
    for rec in steps:
        n = rec["step_number"]
        bid: str | None = rec.get("branch_id")
        if rec.get("is_branch_point"):
            if bid is None:
                raise InvalidParams(
                    "arguments.branch_id: a branch point needs a branch_id",
                    field="arguments.branch_id",
                )
            if rec["branch_from_step"] not in main:
                raise InvalidParams(
                    f"arguments.branch_from_step: step {rec['branch_from_step']} is not on the "
                    "plan's main line",
                    field="arguments.branch_from_step",
                )
            branches.setdefault(bid, {"from_step": rec["branch_from_step"], "steps": {}})
        elif bid is not None and bid not in branches:
            raise InvalidParams(
                f"arguments.branch_id: no branch {bid!r} in this plan; start it with "
                "is_branch_point=true and branch_from_step",
                field="arguments.branch_id",
            )
        target = branches[bid]["steps"] if bid is not None else main
        if rec.get("is_step_revision"):
            rev = rec["revises_step_number"]
            entry = target.get(rev) or main.get(rev)
            if entry is None:
                raise InvalidParams(
                    f"arguments.revises_step_number: step {rev} is not in the plan",
                    field="arguments.revises_step_number",
                )
            entry["step"] = rec["step"]
            if n not in entry["revised_in"]:
                entry["revised_in"].append(n)
            continue
        target[n] = {"step_number": n, "step": rec["step"], "revised_in": []}
    return {
        "main": [main[k] for k in sorted(main)],
        "branches": {
            bid: {"from_step": b["from_step"], "steps": [b["steps"][k] for k in sorted(b["steps"])]}
            for bid, b in branches.items()
        },
    }


def _check_planner_session(earlier: Sequence[Mapping[str, Any]], args: Mapping[str, Any]) -> None:
    build_plan([*earlier, args])


def _planner_progress(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    plan = build_plan(steps)
    return {"plan_steps": len(plan["main"]), "branches": sorted(plan["branches"])}


def _entry_line(entry: Mapping[str, Any], indent: str) -> str:
    revised = ""
    if entry["revised_in"]:
        revised = " (revised in step " + ", ".join(str(n) for n in entry["revised_in"]) + ")"
    return f"{indent}{entry['step_number']}. {entry['step']}{revised}"


def _planner_final(steps: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    plan = build_plan(steps)
    forks: dict[int, list[str]] = {}
    for bid, b in plan["branches"].items():
        forks.setdefault(b["from_step"], []).append(bid)
    n_br = len(plan["branches"])
    lines = [
        f"Plan complete: {plural(len(plan['main']), 'step')} on the main line"
        + (f", {plural(n_br, 'branch', 'branches')}" if n_br else "")
        + ".",
        "",
    ]
    for entry in plan["main"]:
        lines.append(_entry_line(entry, ""))
        for bid in forks.get(entry["step_number"], []):
            lines.append(f'   ↳ branch "{bid}" (from step {entry["step_number"]}):')
            lines += [_entry_line(e, "      ") for e in plan["branches"][bid]["steps"]]
    lines += ["", "Carry out the plan step by step; no model was called to make it."]
    return "\n".join(lines), {"plan": plan["main"], "branches": plan["branches"]}


def _planner_active(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(steps)


PLANNER = WorkflowDefinition(
    name="planner",
    title="Planner",
    description=(
        "Build a step-by-step plan, one step per call, with revisions (is_step_revision, "
        "revises_step_number) and branches (is_branch_point, branch_from_step, branch_id). "
        "Never calls a model: the final step (next_step_required=false) returns the whole plan."
    ),
    omit_fields=frozenset(
        {
            "relevant_files",
            "files",
            "issues_found",
            "confidence",
            "hypothesis",
            "backtrack_from_step",
            "model",
            "temperature",
            "thinking_mode",
            "use_websearch",
        }
    ),
    findings_required=False,
    extra_properties={
        "is_step_revision": {"type": "boolean", "description": "this step revises an earlier one"},
        "revises_step_number": {"type": "integer", "minimum": 1},
        "is_branch_point": {"type": "boolean", "description": "this step starts a branch"},
        "branch_from_step": {"type": "integer", "minimum": 1},
        "branch_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
    },
    calls_model=False,
    first_step_guidance=(
        "Describe the goal, the constraints and the overall approach; then plan the first "
        "concrete step."
    ),
    step_guidance=(
        "Plan the next concrete step. Revise an earlier step with is_step_revision and "
        "revises_step_number; explore an alternative with is_branch_point, branch_from_step "
        "and a branch_id."
    ),
    check_step=_check_planner_step,
    check_session=_check_planner_session,
    active=_planner_active,
    render_final=_planner_final,
    render_progress=_planner_progress,
)

#: The workflow definitions, in ``tools/list`` order.
DEFINITIONS: tuple[WorkflowDefinition, ...] = (THINKDEEP, ANALYZE, CODEREVIEW, DEBUG, PLANNER)


def suite_tools() -> list[ToolSpec]:
    """``thinkdeep``, ``analyze``, ``codereview``, ``debug``, ``planner``, ``consensus`` and
    ``challenge``, in ``tools/list`` order."""
    from exai.tools.challenge import CHALLENGE
    from exai.tools.consensus import CONSENSUS

    return [*(make_workflow_tool(d) for d in DEFINITIONS), CONSENSUS, CHALLENGE]


def register_suite(registry: ToolRegistry) -> ToolRegistry:
    """Register :func:`suite_tools` on ``registry``; returns it.

    Raises:
        ValueError: one of the names is already registered.
    """
    for spec in suite_tools():
        registry.register(spec)
    return registry
