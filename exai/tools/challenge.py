"""The ``challenge`` tool: wrap a statement so the agent re-evaluates it critically.

No model is called: the tool returns the statement inside instructions that tell the calling
agent to check it against the evidence instead of agreeing by reflex. Agents call it when a user
pushes back ("are you sure?", "I think that's wrong") so the answer is reasoned, not reflexive.
"""

from __future__ import annotations

from typing import Any

from exai.tools.base import ToolContext, ToolResult, ToolSpec

__all__ = ["CHALLENGE", "INPUT_SCHEMA", "challenge_prompt"]

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {
            "type": "string",
            "minLength": 1,
            "description": "the statement, claim or pushback to re-evaluate critically",
        },
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


def challenge_prompt(statement: str) -> str:
    """The instructions wrapped around ``statement``."""
    return (
        "CRITICAL REASSESSMENT – do not automatically agree.\n\n"
        f'"{statement}"\n\n'
        "Evaluate this statement on its merits. Is it correct, incomplete, or wrong? Check it "
        "against the code, the documentation and what you have verified in this session. If "
        "it is right, say so and change course; if it is wrong, say so plainly and explain "
        "why, with evidence. Do not apologise or agree merely to be agreeable."
    )


async def _challenge(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    statement: str = args["prompt"]
    instructions = challenge_prompt(statement)
    return ToolResult(
        text=instructions,
        structured={
            "status": "challenge_accepted",
            "original_statement": statement,
            "challenge_prompt": instructions,
        },
    )


CHALLENGE = ToolSpec(
    name="challenge",
    title="Challenge a statement",
    description=(
        "Wrap a statement (often the user's pushback) in instructions to re-evaluate it "
        "critically instead of agreeing by reflex. No model is called."
    ),
    input_schema=INPUT_SCHEMA,
    handler=_challenge,
    timeout_s=5.0,
)
