"""The workflow engine and its tools, through the daemon against a mock upstream over HTTP.

Spec: every suite tool's schema is in ``tools/list`` and enforced (-32602 naming the field);
intermediate steps make no upstream call; the final step makes exactly one whose prompt holds
every step's findings; ``confidence: certain`` and ``planner`` make none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from exai.errors import ToolError
from exai.testing import MockUpstream
from exai.tools.base import ToolContext
from exai.tools.workflow import active_steps, make_workflow_tool
from exai.tools.workflows import CODEREVIEW, build_plan, suite_tools
from tests.helpers import make_settings
from tests.tools.suite import WORKFLOW_TOOLS, Env, error_of, prompts, suite_env

pytestmark = pytest.mark.anyio


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(models=("mock-fast", "mock-pro")) as m:
        yield m


@pytest.fixture
async def env(tmp_path, mock) -> AsyncIterator[Env]:
    async with suite_env(tmp_path, {"a": mock}, fast=("mock-fast",), quality=("mock-pro",)) as e:
        yield e


def step(n: int, total: int, findings: str, *, more: bool = True, **kw: Any) -> dict[str, Any]:
    return {
        "step": f"step {n}: look at the next part",
        "step_number": n,
        "total_steps": total,
        "next_step_required": more,
        "findings": findings,
        **kw,
    }


# -- schemas --------------------------------------------------------------------------------


async def test_tools_list_publishes_every_suite_tool_with_its_schema(env):
    res = await env.rpc.request("tools/list")
    listed = {t["name"]: t for t in res["result"]["tools"]}
    for spec in suite_tools():
        assert listed[spec.name]["inputSchema"] == spec.input_schema
    for name in WORKFLOW_TOOLS:
        required = set(listed[name]["inputSchema"]["required"])
        assert {"step", "step_number", "total_steps", "next_step_required", "findings"} <= required
        props = listed[name]["inputSchema"]["properties"]
        for field in ("relevant_files", "issues_found", "confidence", "hypothesis"):
            assert field in props
    assert "backtrack_from_step" in listed["debug"]["inputSchema"]["properties"]
    assert {"review_type", "focus_on", "standards", "severity_filter"} <= set(
        listed["codereview"]["inputSchema"]["properties"]
    )
    assert {"problem_context", "focus_areas"} <= set(
        listed["thinkdeep"]["inputSchema"]["properties"]
    )
    assert "analysis_type" in listed["analyze"]["inputSchema"]["properties"]
    planner = listed["planner"]["inputSchema"]["properties"]
    assert {"is_step_revision", "revises_step_number", "is_branch_point", "branch_id"} <= set(
        planner
    )
    assert "model" not in planner  # planner never calls a model


@pytest.mark.parametrize(
    ("tool", "args", "field"),
    [
        ("codereview", {k: v for k, v in step(1, 2, "x").items() if k != "findings"},
         "arguments.findings"),
        ("debug", step(0, 2, "x"), "arguments.step_number"),
        ("analyze", step(1, 2, "x", analysis_type="vibes"), "arguments.analysis_type"),
        ("codereview", step(1, 2, "x", issues_found=[{"severity": "urgent", "description": "d"}]),
         "arguments.issues_found[0].severity"),
        ("thinkdeep", step(1, 2, "x", confidence="sure"), "arguments.confidence"),
        ("debug", step(1, 2, "x", relevant_files=["src/app.py"]), "arguments.relevant_files[0]"),
        ("planner", step(1, 2, "x", relevant_files=["/a"]), "arguments.relevant_files"),
        ("consensus", {"prompt": "p", "models": [{"model": "mock-fast"}]}, "arguments.models"),
        ("consensus", {"prompt": "p", "models": [{"model": "mock-fast", "stance": "maybe"},
                                                 {"model": "mock-pro"}]},
         "arguments.models[0].stance"),
        ("challenge", {}, "arguments.prompt"),
    ],
)  # fmt: skip
async def test_invalid_arguments_get_32602_naming_the_field(env, mock, tool, args, field):
    err = error_of(await env.call(tool, args))
    assert err["code"] == -32602
    assert err["data"]["field"] == field
    assert mock.chat_requests == []


async def test_a_later_step_without_continuation_id_is_refused_naming_it(env):
    err = error_of(await env.call("debug", step(2, 3, "found it")))
    assert err["code"] == -32602
    assert err["data"]["field"] == "arguments.continuation_id"
    assert "step 1" in err["message"]


async def test_backtracking_to_a_later_step_is_refused_naming_the_field(env):
    first = await env.ok("debug", step(1, 3, "symptom"))
    err = error_of(
        await env.call(
            "debug",
            step(2, 3, "x", backtrack_from_step=2, continuation_id=first["continuation_id"]),
        )
    )
    assert err["data"]["field"] == "arguments.backtrack_from_step"


async def test_a_file_outside_the_roots_is_refused_at_the_step_that_names_it(env, tmp_path):
    err = error_of(
        await env.call("codereview", step(1, 2, "x", relevant_files=[str(tmp_path / "x.py")]))
    )
    assert err["code"] == -32602
    assert err["data"]["reason"] == "file_denied"
    assert err["data"]["field"] == "arguments.relevant_files[0]"


# -- sessions -------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", WORKFLOW_TOOLS)
async def test_a_session_calls_the_model_once_on_the_final_step_with_every_finding(env, mock, tool):
    code = env.root / "service.py"
    code.write_text("def handler(req):\n    return db.query(req.args['id'])  # MARKER-42\n")
    first = await env.ok(tool, step(1, 3, "FINDING-ONE: entry point is handler()"))
    cid = first["continuation_id"]
    assert first["status"] == "pause_for_investigation"
    assert first["next_step"]["step_number"] == 2
    assert f'continuation_id="{cid}"' in first["_text"]
    assert mock.chat_requests == []

    second = await env.ok(
        tool,
        step(
            2,
            3,
            "FINDING-TWO: the id is not validated",
            continuation_id=cid,
            relevant_files=[str(code)],
            issues_found=[{"severity": "high", "description": "ISSUE-SQL injection"}],
            hypothesis="HYPOTHESIS-unvalidated input",
            confidence="medium",
        ),
    )
    assert second["continuation_id"] == cid
    assert second["issues_by_severity"]["high"] == 1
    assert mock.chat_requests == []

    final = await env.ok(
        tool,
        step(3, 3, "FINDING-THREE: confirmed", more=False, continuation_id=cid, confidence="high"),
    )
    assert len(mock.chat_requests) == 1
    request = mock.chat_requests[0].json
    assert request["model"] == "mock-pro"  # auto on a final step picks the quality class
    prompt = prompts(mock)[0]
    for needle in (
        "FINDING-ONE",
        "FINDING-TWO",
        "FINDING-THREE",
        "ISSUE-SQL injection",
        "HYPOTHESIS-unvalidated input",
        "MARKER-42",  # the relevant file's contents
    ):
        assert needle in prompt, needle
    assert final["status"] == "complete"
    assert final["expert_analysis"]["model"] == "mock-pro"
    assert final["expert_analysis"]["content"].startswith("mock:mock-pro:")
    assert final["continuation_id"] == cid


@pytest.mark.parametrize("tool", WORKFLOW_TOOLS)
async def test_confidence_certain_on_the_final_step_skips_the_model(env, mock, tool):
    first = await env.ok(tool, step(1, 2, "looked"))
    final = await env.ok(
        tool,
        step(
            2,
            2,
            "sure of it",
            more=False,
            continuation_id=first["continuation_id"],
            confidence="certain",
            issues_found=[{"severity": "low", "description": "typo in a log line"}],
        ),
    )
    assert mock.chat_requests == []
    assert final["expert_analysis"] is None
    assert final["expert_skipped"] == "confidence is certain"
    assert "typo in a log line" in final["_text"]


async def test_a_resent_step_is_stored_once(env, mock):
    first = await env.ok("analyze", step(1, 3, "map"))
    cid = first["continuation_id"]
    again = step(2, 3, "RESENT-FINDING", continuation_id=cid)
    a = await env.ok("analyze", again)
    b = await env.ok("analyze", again)
    assert a["remaining_turns"] == b["remaining_turns"]
    await env.ok("analyze", step(3, 3, "done", more=False, continuation_id=cid))
    assert prompts(mock)[0].count("RESENT-FINDING") == 1


async def test_backtracking_discards_the_later_steps_from_the_final_prompt(env, mock):
    first = await env.ok("debug", step(1, 4, "symptom: 500 on /orders"))
    cid = first["continuation_id"]
    await env.ok("debug", step(2, 4, "DEAD-END: blamed the cache", continuation_id=cid))
    back = await env.ok(
        "debug",
        step(3, 4, "RETRY: the cache is fine, look at the ORM", backtrack_from_step=2,
             continuation_id=cid),
    )  # fmt: skip
    assert "Backtracked" in back["_text"]
    await env.ok("debug", step(4, 4, "ROOT-CAUSE: N+1 query", more=False, continuation_id=cid))
    prompt = prompts(mock)[0]
    assert "DEAD-END" not in prompt
    assert "RETRY" in prompt and "ROOT-CAUSE" in prompt and "symptom" in prompt


async def test_codereview_fields_shape_the_expert_prompt(env, mock):
    first = await env.ok(
        "codereview",
        step(1, 1, "reviewed", more=False, review_type="security", focus_on="AUTHZ-CHECKS",
             standards="PEP 8", severity_filter="high"),
    )  # fmt: skip
    assert first["status"] == "complete"
    prompt = prompts(mock)[0]
    assert "security code review" in prompt
    assert "AUTHZ-CHECKS" in prompt and "PEP 8" in prompt and "Severity filter: high" in prompt


async def test_a_step_above_total_steps_raises_the_total(env):
    first = await env.ok("thinkdeep", step(1, 1, "bigger than thought"))
    assert first["total_steps"] == 1
    second = await env.ok("thinkdeep", step(3, 2, "x", continuation_id=first["continuation_id"]))
    assert second["total_steps"] == 3


# -- planner --------------------------------------------------------------------------------


def plan_step(n: int, text: str, cid: str | None, *, more: bool = True, **kw: Any) -> dict:
    args: dict[str, Any] = {
        "step": text,
        "step_number": n,
        "total_steps": 7,
        "next_step_required": more,
        **kw,
    }
    if cid:
        args["continuation_id"] = cid
    return args


async def test_planner_session_with_a_revision_and_a_branch_never_calls_a_model(env, mock):
    first = await env.ok("planner", plan_step(1, "Goal: ship the export feature", None))
    cid = first["continuation_id"]
    assert first["status"] == "planning"
    await env.ok("planner", plan_step(2, "Write the CSV writer", cid))
    await env.ok("planner", plan_step(3, "Add the HTTP endpoint", cid))
    await env.ok(
        "planner",
        plan_step(4, "Write a streaming CSV writer", cid, is_step_revision=True,
                  revises_step_number=2),
    )  # fmt: skip
    branch = await env.ok(
        "planner",
        plan_step(5, "Alternative: a background job that emails the file", cid,
                  is_branch_point=True, branch_from_step=3, branch_id="async-job"),
    )  # fmt: skip
    assert branch["branches"] == ["async-job"]
    await env.ok("planner", plan_step(6, "Queue the job from the endpoint", cid,
                                      branch_id="async-job"))  # fmt: skip
    final = await env.ok("planner", plan_step(7, "Document it", cid, more=False))
    assert mock.chat_requests == []
    assert mock.request_count == 0
    text = final["_text"]
    assert "2. Write a streaming CSV writer (revised in step 4)" in text
    assert 'branch "async-job" (from step 3)' in text
    assert "6. Queue the job from the endpoint" in text
    assert [e["step_number"] for e in final["plan"]] == [1, 2, 3, 7]
    assert [e["step_number"] for e in final["branches"]["async-job"]["steps"]] == [5, 6]


async def test_planner_counts_in_words_a_person_reads(env):
    one = {**plan_step(1, "Just do it", None, more=False), "total_steps": 1}
    final = await env.ok("planner", one)
    assert final["_text"].startswith("Plan complete: 1 step on the main line.")
    first = await env.ok("planner", plan_step(1, "Goal", None))
    await env.ok(
        "planner",
        plan_step(2, "Alternative", first["continuation_id"], is_branch_point=True,
                  branch_from_step=1, branch_id="b"),
    )  # fmt: skip
    final = await env.ok("planner", plan_step(3, "Done", first["continuation_id"], more=False))
    assert final["_text"].startswith("Plan complete: 2 steps on the main line, 1 branch.")


async def test_planner_refuses_a_step_of_a_branch_that_was_never_started(env):
    first = await env.ok("planner", plan_step(1, "goal", None))
    err = error_of(
        await env.call("planner", plan_step(2, "x", first["continuation_id"], branch_id="nowhere"))
    )
    assert err["data"]["field"] == "arguments.branch_id"


async def test_planner_refuses_a_revision_without_the_step_it_revises(env):
    first = await env.ok("planner", plan_step(1, "goal", None))
    err = error_of(
        await env.call(
            "planner", plan_step(2, "x", first["continuation_id"], is_step_revision=True)
        )
    )
    assert err["data"]["field"] == "arguments.revises_step_number"


# -- units ------------------------------------------------------------------------------------


def test_active_steps_apply_backtracks_and_replacements():
    recs = [
        {"step_number": 1, "findings": "a"},
        {"step_number": 2, "findings": "b"},
        {"step_number": 3, "findings": "c"},
        {"step_number": 2, "findings": "b2", "backtrack_from_step": 2},
        {"step_number": 3, "findings": "c2"},
    ]
    assert [s["findings"] for s in active_steps(recs)] == ["a", "b2", "c2"]


def test_build_plan_marks_revisions_and_nests_branches():
    plan = build_plan(
        [
            {"step_number": 1, "step": "one"},
            {"step_number": 2, "step": "two"},
            {"step_number": 3, "step": "two, better", "is_step_revision": True,
             "revises_step_number": 2},
            {"step_number": 4, "step": "alt", "is_branch_point": True, "branch_from_step": 1,
             "branch_id": "b"},
        ]
    )  # fmt: skip
    assert plan["main"][1] == {"step_number": 2, "step": "two, better", "revised_in": [3]}
    assert plan["branches"]["b"]["from_step"] == 1


async def test_workflow_without_a_conversation_store_says_it_needs_one(tmp_path):
    spec = make_workflow_tool(CODEREVIEW)
    ctx = ToolContext(settings=make_settings(tmp_path), services={})
    with pytest.raises(ToolError, match="needs the conversation store"):
        await spec.handler(step(1, 2, "x"), ctx)
