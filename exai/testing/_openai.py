"""Sans-IO replies of the mock upstream: an OpenAI chat request in, response dicts out.

Pure functions, no sockets and no clock, so the reply rules are testable on their own and the
server in :mod:`exai.testing.mock_upstream` only moves bytes. The rules are documented in that
module's docstring.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

__all__ = [
    "CREATED",
    "ChatReply",
    "RequestError",
    "build_reply",
    "error_body",
    "reply_chunks",
    "reply_json",
    "split_words",
]

# A fixed Unix time: replies are deterministic and the mock never reads the wall clock.
CREATED = 1_700_000_000
CONTENT_CHUNKS = 8
REASONING_CHUNKS = 4
KIMI_SEARCH_CALL_ID = "call_ws_1"


class RequestError(Exception):
    """The request is invalid the way the real API would say it: status, type, code."""

    def __init__(self, status: int, message: str, *, type_: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


def error_body(message: str, *, type_: str, code: str | None) -> dict[str, Any]:
    """An OpenAI-style error document."""
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


@attrs.frozen(kw_only=True)
class ChatReply:
    """What the mock answers to one chat request, before it is rendered as JSON or SSE."""

    id: str
    model: str
    content: str
    reasoning_content: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    finish_reason: str = "stop"
    prompt_tokens: int
    completion_tokens: int
    web_search: tuple[dict[str, str], ...] | None = None

    @property
    def usage(self) -> dict[str, int]:
        """OpenAI usage block."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def content_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a parts list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _has_tool(tools: Any, predicate: Any) -> bool:
    return isinstance(tools, list) and any(isinstance(t, dict) and predicate(t) for t in tools)


def _is_kimi_search(tool: dict[str, Any]) -> bool:
    function = tool.get("function")
    return (
        tool.get("type") == "builtin_function"
        and isinstance(function, dict)
        and function.get("name") == "$web_search"
    )


def _check_search_echo(messages: list[dict[str, Any]]) -> None:
    """Each ``role: tool`` answer to ``$web_search`` must echo the call's arguments."""
    calls: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                calls[str(call.get("id"))] = str(call["function"].get("arguments", ""))
    for message in messages:
        if message.get("role") != "tool":
            continue
        call_id = str(message.get("tool_call_id"))
        if call_id not in calls:
            raise RequestError(
                400,
                f"tool message answers unknown tool_call_id {call_id!r}",
                type_="invalid_request_error",
                code="invalid_tool_call_id",
            )
        try:
            same = json.loads(content_text(message.get("content"))) == json.loads(calls[call_id])
        except ValueError:
            same = False
        if not same:
            raise RequestError(
                400,
                "the $web_search tool message must echo the tool call's arguments",
                type_="invalid_request_error",
                code="invalid_tool_message",
            )


def build_reply(body: Any, *, completion_id: str) -> ChatReply:
    """Answer one ``/chat/completions`` body (already parsed JSON).

    Raises:
        RequestError: the body is not a valid chat request (400).
    """
    if not isinstance(body, dict):
        raise RequestError(
            400, "the body must be a JSON object", type_="invalid_request_error", code="bad_body"
        )
    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str) or not model:
        raise RequestError(
            400, "`model` is required", type_="invalid_request_error", code="missing_model"
        )
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise RequestError(
            400,
            "`messages` must be a non-empty list of objects",
            type_="invalid_request_error",
            code="invalid_messages",
        )
    user_messages = [m for m in messages if m.get("role") == "user"]
    last_user = content_text(user_messages[-1].get("content")) if user_messages else ""
    prompt_chars = sum(len(content_text(m.get("content"))) for m in messages)
    prompt_tokens = prompt_chars // 4 + 1
    tools = body.get("tools")
    has_tool_message = any(m.get("role") == "tool" for m in messages)

    if _has_tool(tools, _is_kimi_search) and not has_tool_message:
        arguments = json.dumps({"query": last_user[:200]})
        call = {
            "id": KIMI_SEARCH_CALL_ID,
            "type": "builtin_function",
            "function": {"name": "$web_search", "arguments": arguments},
        }
        return ChatReply(
            id=completion_id,
            model=model,
            content="",
            tool_calls=(call,),
            finish_reason="tool_calls",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(arguments) // 4 + 1,
        )
    if has_tool_message:
        _check_search_echo(messages)
        content = f"mock:{model}: web search results for: {last_user[:200]}"
    else:
        content = f"mock:{model}: {last_user[:200]}"

    thinking = body.get("thinking")
    wants_reasoning = "thinking" in model or (
        isinstance(thinking, dict) and thinking.get("type") == "enabled"
    )
    reasoning = f"mock reasoning by {model} about: {last_user[:100]}" if wants_reasoning else None
    web_search = None
    if _has_tool(tools, lambda t: t.get("type") == "web_search"):
        query = last_user[:100]
        web_search = (
            {
                "title": f"Mock result 1 for {query}",
                "link": "https://example.com/mock/1",
                "content": f"mock search content about {query}",
                "media": "mock",
                "refer": "ref_1",
            },
            {
                "title": f"Mock result 2 for {query}",
                "link": "https://example.com/mock/2",
                "content": f"more mock search content about {query}",
                "media": "mock",
                "refer": "ref_2",
            },
        )
    return ChatReply(
        id=completion_id,
        model=model,
        content=content,
        reasoning_content=reasoning,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(content) // 4 + 1,
        web_search=web_search,
    )


def _message(reply: ChatReply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning_content is not None:
        message["reasoning_content"] = reply.reasoning_content
    if reply.tool_calls:
        message["tool_calls"] = [dict(call) for call in reply.tool_calls]
    return message


def reply_json(reply: ChatReply) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` document."""
    doc: dict[str, Any] = {
        "id": reply.id,
        "object": "chat.completion",
        "created": CREATED,
        "model": reply.model,
        "choices": [{"index": 0, "message": _message(reply), "finish_reason": reply.finish_reason}],
        "usage": reply.usage,
    }
    if reply.web_search is not None:
        doc["web_search"] = [dict(item) for item in reply.web_search]
    return doc


def split_words(text: str, parts: int) -> list[str]:
    """Split ``text`` at spaces into at most ``parts`` pieces that join back to ``text``."""
    if not text:
        return []
    words = text.split(" ")
    tokens = [word + " " for word in words[:-1]] + [words[-1]]
    tokens = [token for token in tokens if token]
    per = -(-len(tokens) // parts)
    return ["".join(tokens[i : i + per]) for i in range(0, len(tokens), per)]


def reply_chunks(reply: ChatReply) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` documents of a streamed reply, in order.

    A role chunk, then reasoning deltas (if any), then content or tool-call deltas, then a final
    chunk with ``finish_reason`` and ``usage`` (always sent, whatever ``stream_options`` says).
    """

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": reply.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": reply.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    chunks = [chunk({"role": "assistant", "content": ""})]
    if reply.web_search is not None:
        chunks[0]["web_search"] = [dict(item) for item in reply.web_search]
    if reply.reasoning_content:
        for piece in split_words(reply.reasoning_content, REASONING_CHUNKS):
            chunks.append(chunk({"reasoning_content": piece}))
    for piece in split_words(reply.content, CONTENT_CHUNKS):
        chunks.append(chunk({"content": piece}))
    for index, call in enumerate(reply.tool_calls):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
    final = chunk({}, reply.finish_reason)
    final["usage"] = reply.usage
    chunks.append(final)
    return chunks
