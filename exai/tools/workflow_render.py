"""What a workflow step says: the answer of an intermediate step (what to do next and how to
call again), the evidence gathered so far (issues by severity, files), and the one prompt the
expert analysis gets on the final step. Pure functions over the active steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from exai.tools.base import ToolResult
from exai.tools.workflow_model import SEVERITIES, WorkflowDefinition, canonical, step_files

__all__ = [
    "all_files",
    "all_issues",
    "expert_prompt",
    "intermediate_result",
    "issue_counts",
    "next_guidance",
    "plural",
]


def plural(n: int, word: str, words: str | None = None) -> str:
    """``plural(1, "step")`` → ``"1 step"``, ``plural(2, "step")`` → ``"2 steps"``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def next_guidance(defn: WorkflowDefinition, rec: Mapping[str, Any]) -> str:
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


def intermediate_result(
    defn: WorkflowDefinition,
    rec: Mapping[str, Any],
    active: Sequence[dict[str, Any]],
    base: dict[str, Any],
    *,
    raised: bool,
) -> ToolResult:
    n, total, cid = rec["step_number"], base["total_steps"], base["continuation_id"]
    guidance = next_guidance(defn, rec)
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
        structured["issues_by_severity"] = issue_counts(active)
        if rec.get("confidence"):
            structured["confidence"] = rec["confidence"]
    if defn.render_progress is not None:
        structured.update(defn.render_progress(active))
    return ToolResult(text="\n".join(lines), structured=structured)


def all_issues(active: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for rec in active:
        for issue in rec.get("issues_found") or ():
            k = canonical(issue)
            if k not in seen:
                seen.add(k)
                out.append(dict(issue))
    out.sort(key=lambda i: SEVERITIES.index(i.get("severity", "low")))
    return out


def issue_counts(active: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(SEVERITIES, 0)
    for issue in all_issues(active):
        counts[issue["severity"]] += 1
    return counts


def all_files(active: Sequence[Mapping[str, Any]], args: Mapping[str, Any]) -> list[str]:
    files: list[str] = []
    for rec in [*active, args]:
        files.extend(step_files(rec))
    return list(dict.fromkeys(files))


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "not specified"


def _render_value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v) or "none"
    return str(v)


def expert_prompt(
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
        if step_files(rec):
            out.append("Files: " + ", ".join(step_files(rec)))
        for issue in rec.get("issues_found") or ():
            where = f" ({issue['location']})" if issue.get("location") else ""
            out.append(f"- issue [{issue['severity']}] {issue['description']}{where}")
    issues = all_issues(active)
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
