"""MockUpstream: a real OpenAI-compatible server on loopback whose faults do what they say.

Clients are httpx.AsyncClient over real sockets. Time is trio's MockClock: latency, hangs and
give-ups cost no wall-clock time, and durations are asserted on the event loop's clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import h11
import httpx
import pytest
import trio.testing
from anyio import open_process  # imported early: a lazy import inside a test trips CPython 3.11.7

from exai.testing import Fault, MockUpstream, RecordedRequest, _http, mock_upstream

KEY = "sk-mock-test"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(models=("mock-fast", "mock-pro", "kimi-thinking-preview")) as server:
        yield server
    assert server.errors == []


@pytest.fixture
async def client(mock: MockUpstream) -> AsyncIterator[httpx.AsyncClient]:
    # No httpx timeouts: under the mock clock a deadline would jump; tests bound waits themselves.
    async with httpx.AsyncClient(base_url=mock.base_url, timeout=None) as http:
        yield http


def chat_body(text: str = "hello mock", model: str = "mock-fast", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def read_sse(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an event stream, in order."""
    return [
        line.removeprefix("data: ")
        async for line in response.aiter_lines()
        if line.startswith("data: ")
    ]


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> list[str]:
    async with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        return await read_sse(resp)


# -- replies -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_plain_reply_has_the_openai_shape_and_usage(client: httpx.AsyncClient) -> None:
    body = {
        "model": "mock-pro",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "x" * 300},
        ],
    }
    resp = await client.post("/chat/completions", json=body)
    assert resp.status_code == 200
    doc = resp.json()
    content = "mock:mock-pro: " + "x" * 200
    assert doc["object"] == "chat.completion"
    assert doc["id"].startswith("chatcmpl-mock-")
    assert isinstance(doc["created"], int)
    assert doc["model"] == "mock-pro"
    assert doc["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    ]
    prompt_tokens = (len("be brief") + 300) // 4 + 1
    completion_tokens = len(content) // 4 + 1
    assert doc["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@pytest.mark.anyio
async def test_chat_is_served_with_and_without_the_v1_prefix(mock: MockUpstream) -> None:
    async with httpx.AsyncClient(timeout=None) as http:
        root = f"http://127.0.0.1:{mock.port}"
        with_v1 = await http.post(f"{root}/v1/chat/completions", json=chat_body())
        without = await http.post(f"{root}/chat/completions", json=chat_body())
    assert with_v1.status_code == without.status_code == 200
    assert len(mock.chat_requests) == 2


@pytest.mark.anyio
async def test_content_parts_lists_are_read_as_text(client: httpx.AsyncClient) -> None:
    parts = [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "x"}}]
    body = {"model": "mock-fast", "messages": [{"role": "user", "content": parts}]}
    resp = await client.post("/chat/completions", json=body)
    assert resp.json()["choices"][0]["message"]["content"] == "mock:mock-fast: look "


@pytest.mark.anyio
async def test_stream_chunks_join_to_the_content_and_end_with_done(
    client: httpx.AsyncClient,
) -> None:
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    events = await stream_chat(client, chat_body(text))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == f"mock:mock-fast: {text}"
    assert 4 <= sum(1 for p in pieces if p) <= 8
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == len(f"mock:mock-fast: {text}") // 4 + 1


@pytest.mark.anyio
async def test_chunk_delay_spaces_the_stream_events(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.chunk_delay_s = 0.5
    start = anyio.current_time()
    events = await stream_chat(client, chat_body("a b c"))
    assert anyio.current_time() - start >= 0.5 * len(events)


@pytest.mark.anyio
async def test_models_lists_the_configured_models(client: httpx.AsyncClient) -> None:
    resp = await client.get("/models")
    assert resp.status_code == 200
    assert resp.json() == {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "owned_by": "mock"}
            for m in ("mock-fast", "mock-pro", "kimi-thinking-preview")
        ],
    }


@pytest.mark.anyio
async def test_keep_alive_serves_many_requests_on_one_connection(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    for _ in range(5):
        assert (await client.post("/chat/completions", json=chat_body())).status_code == 200
    async with client.stream("POST", "/chat/completions", json=chat_body(stream=True)) as resp:
        await read_sse(resp)
    assert (await client.get("/models")).status_code == 200
    assert mock.connections == 1
    assert mock.request_count == 7


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_or_missing_api_key_is_401_with_an_openai_error() -> None:
    async with MockUpstream(api_key=KEY) as mock, httpx.AsyncClient(timeout=None) as http:
        url = f"{mock.base_url}/chat/completions"
        wrong = await http.post(url, json=chat_body(), headers={"authorization": "Bearer nope"})
        missing = await http.post(url, json=chat_body())
        models = await http.get(f"{mock.base_url}/models")
        right = await http.post(url, json=chat_body(), headers={"authorization": f"Bearer {KEY}"})
    assert wrong.status_code == missing.status_code == models.status_code == 401
    error = wrong.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert KEY not in wrong.text
    assert right.status_code == 200


@pytest.mark.anyio
async def test_unknown_model_is_404_when_models_are_strict(client: httpx.AsyncClient) -> None:
    resp = await client.post("/chat/completions", json=chat_body(model="gpt-nope"))
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"


@pytest.mark.anyio
async def test_any_model_is_served_when_models_are_not_strict() -> None:
    async with (
        MockUpstream(models=("a",), strict_models=False) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=None) as http,
    ):
        resp = await http.post("/chat/completions", json=chat_body(model="other"))
    assert resp.json()["choices"][0]["message"]["content"].startswith("mock:other: ")


@pytest.mark.anyio
async def test_unknown_route_is_a_404_json_error(client: httpx.AsyncClient) -> None:
    resp = await client.get("/embeddings")
    assert resp.status_code == 404
    assert "error" in resp.json()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", json.dumps({"model": "mock-fast"}).encode()],
    ids=["not-json", "not-object", "no-messages"],
)
async def test_a_body_that_is_not_a_chat_request_is_400(
    client: httpx.AsyncClient, body: bytes
) -> None:
    resp = await client.post("/chat/completions", content=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_a_body_over_the_limit_is_413() -> None:
    async with (
        MockUpstream(max_body_bytes=1000) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=None) as http,
    ):
        resp = await http.post("/chat/completions", json=chat_body("x" * 2000))
    assert resp.status_code == 413


@pytest.mark.anyio
async def test_headers_over_max_header_bytes_are_400_like_kimi() -> None:
    async with (
        MockUpstream(max_header_bytes=4096) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=None) as http,
    ):
        big = await http.post("/chat/completions", json=chat_body(), headers={"x-big": "y" * 5000})
        small = await http.post("/chat/completions", json=chat_body())
    assert big.status_code == 400
    assert small.status_code == 200


# -- faults --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_faults_are_consumed_in_order_one_per_chat_request(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.status(503), times=2)
    mock.push(Fault.status(500))
    codes = [(await client.post("/chat/completions", json=chat_body())).status_code for _ in "1234"]
    assert codes == [503, 503, 500, 200]
    assert mock.pending_faults == ()


@pytest.mark.anyio
async def test_status_fault_answers_an_openai_error_body(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.status(502))
    resp = await client.post("/chat/completions", json=chat_body())
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "server_error"
    assert "retry-after" not in resp.headers


@pytest.mark.anyio
async def test_rate_limited_is_429_with_retry_after(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.rate_limited(retry_after_s=2))
    resp = await client.post("/chat/completions", json=chat_body())
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "2"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.anyio
async def test_faults_act_before_authentication() -> None:
    async with (
        MockUpstream(api_key=KEY) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=None) as http,
    ):
        mock.push(Fault.status(503))
        resp = await http.post("/chat/completions", json=chat_body())
    assert resp.status_code == 503


@pytest.mark.anyio
async def test_latency_fault_delays_the_answer(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.latency(1.5))
    start = anyio.current_time()
    resp = await client.post("/chat/completions", json=chat_body())
    assert resp.status_code == 200
    assert anyio.current_time() - start >= 1.5
    start = anyio.current_time()
    await client.post("/chat/completions", json=chat_body())
    assert anyio.current_time() - start < 1.5


@pytest.mark.anyio
async def test_base_latency_delays_every_chat_request(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.latency_s = 0.2
    start = anyio.current_time()
    for _ in range(3):
        await client.post("/chat/completions", json=chat_body())
    assert anyio.current_time() - start >= 0.6


@pytest.mark.anyio
async def test_a_client_leaving_during_latency_is_counted_and_stops_the_handler(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.latency(60))
    with anyio.move_on_after(1):
        await client.post("/chat/completions", json=chat_body())
    with anyio.fail_after(5):
        await mock.wait_disconnect(1)
    assert mock.active == 0


@pytest.mark.anyio
async def test_reset_is_a_transport_error_for_httpx(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.reset())
    with pytest.raises(httpx.TransportError):
        await client.post("/chat/completions", json=chat_body())
    assert (await client.post("/chat/completions", json=chat_body())).status_code == 200
    assert mock.disconnects == 0


@pytest.mark.anyio
async def test_hang_never_answers_and_a_give_up_is_a_disconnect(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.hang())
    with anyio.move_on_after(30) as gave_up:
        await client.post("/chat/completions", json=chat_body())
    assert gave_up.cancelled_caught
    with anyio.fail_after(5):
        await mock.wait_disconnect(1)
    assert mock.disconnects == 1
    assert mock.active == 0


@pytest.mark.anyio
async def test_stream_stall_sends_n_chunks_then_nothing(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.stream_stall(after_chunks=2))
    received: list[str] = []
    with anyio.move_on_after(30) as gave_up:
        async with client.stream("POST", "/chat/completions", json=chat_body(stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    received.append(line)
    assert gave_up.cancelled_caught
    assert len(received) == 2
    with anyio.fail_after(5):
        await mock.wait_disconnect(1)


@pytest.mark.anyio
async def test_stream_break_sends_n_chunks_then_closes(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.stream_break(after_chunks=2))
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/chat/completions", json=chat_body(stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    received.append(line)
    assert len(received) == 2
    assert mock.disconnects == 0


@pytest.mark.anyio
async def test_stream_break_on_a_plain_request_cuts_the_body(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.stream_break())
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=chat_body())


@pytest.mark.anyio
async def test_malformed_body_fails_json_parsing(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.malformed())
    resp = await client.post("/chat/completions", json=chat_body())
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        resp.json()


@pytest.mark.anyio
async def test_malformed_stream_has_an_event_that_is_not_json(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.push(Fault.malformed())
    events = await stream_chat(client, chat_body())
    assert events[-1] == "[DONE]"
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[0])


@pytest.mark.anyio
async def test_set_fault_applies_to_every_request_until_cleared(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.set_fault(Fault.status(500))
    codes = [(await client.post("/chat/completions", json=chat_body())).status_code for _ in "12"]
    models = await client.get("/models")
    mock.set_fault(None)
    after = await client.post("/chat/completions", json=chat_body())
    assert codes == [500, 500]
    assert models.status_code == 500
    assert after.status_code == 200


@pytest.mark.anyio
async def test_a_queued_fault_wins_over_the_standing_one(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.set_fault(Fault.status(500))
    mock.push(Fault.rate_limited(retry_after_s=1))
    first = await client.post("/chat/completions", json=chat_body())
    second = await client.post("/chat/completions", json=chat_body())
    assert (first.status_code, second.status_code) == (429, 500)


@pytest.mark.anyio
async def test_fault_for_clears_itself_after_its_duration(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.fault_for(Fault.status(503), duration_s=10)
    during = await client.post("/chat/completions", json=chat_body())
    await anyio.sleep(9)
    still = await client.post("/chat/completions", json=chat_body())
    await anyio.sleep(1.5)
    after = await client.post("/chat/completions", json=chat_body())
    assert (during.status_code, still.status_code, after.status_code) == (503, 503, 200)
    assert mock.fault is None


def test_fault_constructors_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        Fault.status(200)
    with pytest.raises(ValueError):
        Fault.latency(-1)


# -- recording -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_recorded_requests_hold_method_path_headers_and_body(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    before = anyio.current_time()
    body = chat_body("recorded", temperature=0.3)
    await client.post("/chat/completions?x=1", json=body, headers={"X-Trace": "abc"})
    await client.get("/models")
    first, second = mock.requests
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.headers["x-trace"] == "abc"
    assert first.headers["content-type"] == "application/json"
    assert first.json == body
    assert json.loads(first.body) == body
    assert first.started_at >= before
    assert (second.method, second.path, second.json) == ("GET", "/v1/models", None)
    assert mock.chat_requests == [first]


@pytest.mark.anyio
async def test_recorded_requests_are_bounded() -> None:
    async with (
        MockUpstream(max_recorded=3) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=None) as http,
    ):
        for i in range(5):
            await http.post("/chat/completions", json=chat_body(f"n{i}"))
    assert [r.json["messages"][0]["content"] for r in mock.requests] == ["n2", "n3", "n4"]
    assert mock.request_count == 5


# -- reasoning and web search --------------------------------------------------------------


@pytest.mark.anyio
async def test_thinking_models_return_reasoning_content(client: httpx.AsyncClient) -> None:
    resp = await client.post("/chat/completions", json=chat_body(model="kimi-thinking-preview"))
    message = resp.json()["choices"][0]["message"]
    assert message["reasoning_content"]
    assert message["content"] == "mock:kimi-thinking-preview: hello mock"


@pytest.mark.anyio
async def test_streamed_reasoning_comes_before_the_content(client: httpx.AsyncClient) -> None:
    events = await stream_chat(client, chat_body(model="kimi-thinking-preview"))
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    kinds = [k for d in deltas for k in d if k in ("reasoning_content", "content") and d[k]]
    assert kinds[0] == "reasoning_content"
    assert kinds[-1] == "content"
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")


@pytest.mark.anyio
async def test_glm_thinking_enabled_returns_reasoning_content(client: httpx.AsyncClient) -> None:
    body = chat_body(thinking={"type": "enabled"})
    plain = await client.post("/chat/completions", json=chat_body())
    thinking = await client.post("/chat/completions", json=body)
    assert "reasoning_content" not in plain.json()["choices"][0]["message"]
    assert thinking.json()["choices"][0]["message"]["reasoning_content"]


KIMI_SEARCH_TOOL = {"type": "builtin_function", "function": {"name": "$web_search"}}


@pytest.mark.anyio
async def test_kimi_web_search_loop_asks_for_the_tool_then_answers(
    client: httpx.AsyncClient,
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "news about trio"}]
    first = await client.post(
        "/chat/completions",
        json={"model": "mock-fast", "messages": messages, "tools": [KIMI_SEARCH_TOOL]},
    )
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "call_ws_1"
    assert call["type"] == "builtin_function"
    assert call["function"]["name"] == "$web_search"
    assert json.loads(call["function"]["arguments"])["query"] == "news about trio"

    messages += [
        choice["message"],
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "name": "$web_search",
            "content": call["function"]["arguments"],
        },
    ]
    second = await client.post(
        "/chat/completions",
        json={"model": "mock-fast", "messages": messages, "tools": [KIMI_SEARCH_TOOL]},
    )
    final = second.json()["choices"][0]
    assert final["finish_reason"] == "stop"
    assert "web search" in final["message"]["content"]


@pytest.mark.anyio
async def test_kimi_web_search_call_streams_as_a_tool_call_delta(
    client: httpx.AsyncClient,
) -> None:
    events = await stream_chat(client, chat_body("q", tools=[KIMI_SEARCH_TOOL]))
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0][0]["function"]["name"] == "$web_search"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.anyio
async def test_kimi_tool_message_that_does_not_echo_the_arguments_is_400(
    client: httpx.AsyncClient,
) -> None:
    call = {
        "id": "call_ws_1",
        "type": "builtin_function",
        "function": {"name": "$web_search", "arguments": '{"query": "q"}'},
    }
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_ws_1", "content": '{"query": "other"}'},
    ]
    resp = await client.post(
        "/chat/completions",
        json={"model": "mock-fast", "messages": messages, "tools": [KIMI_SEARCH_TOOL]},
    )
    assert resp.status_code == 400


@pytest.mark.anyio
async def test_glm_web_search_tool_adds_a_web_search_list(client: httpx.AsyncClient) -> None:
    tool = {"type": "web_search", "web_search": {"enable": True, "search_result": True}}
    resp = await client.post("/chat/completions", json=chat_body("glm news", tools=[tool]))
    doc = resp.json()
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["web_search"]
    assert all({"title", "link"} <= set(item) for item in doc["web_search"])
    events = await stream_chat(client, chat_body("glm news", tools=[tool]))
    assert json.loads(events[0])["web_search"] == doc["web_search"]


# -- lifecycle and load --------------------------------------------------------------------


@pytest.mark.anyio
async def test_exit_cancels_requests_in_flight_and_leaves_no_tasks() -> None:
    before = {task.id for task in anyio.get_running_tasks()}
    async with httpx.AsyncClient(timeout=None) as http:
        failures: list[BaseException] = []

        async def call(url: str) -> None:
            try:
                await http.post(url, json=chat_body())
            except httpx.TransportError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg, MockUpstream() as mock:
            mock.set_fault(Fault.hang())
            for _ in range(3):
                tg.start_soon(call, f"{mock.base_url}/chat/completions")
            with anyio.fail_after(5):
                while mock.active < 3:
                    await anyio.sleep(0.01)
        assert len(failures) == 3
    assert {task.id for task in anyio.get_running_tasks()} == before


async def raw_chat(port: int, i: int) -> int:
    """One chat request over a fresh raw socket (httpx's pool is too slow for thousands)."""
    body = json.dumps(chat_body(f"req {i}")).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(head + body)
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    status_line, _, rest = data.partition(b"\r\n")
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["object"] == "chat.completion"
    return int(status_line.split()[1])


async def many_concurrent_requests(n: int, latency_s: float, *, raw: bool) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        MockUpstream(latency_s=latency_s) as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=None, limits=limits) as http,
    ):
        codes: list[int] = []

        async def call(i: int) -> None:
            if raw:
                code = await raw_chat(mock.port, i)
            else:
                code = (
                    await http.post("/chat/completions", json=chat_body(f"req {i}"))
                ).status_code
            codes.append(code)

        start = anyio.current_time()
        with anyio.fail_after(latency_s * 10 + 60):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(call, i)
        assert codes == [200] * n
        assert mock.peak_active == n  # every request waited at the same time: no serialisation
        assert anyio.current_time() - start < latency_s * 2
        assert mock.errors == []


@pytest.mark.anyio
async def test_many_concurrent_requests_wait_their_latency_together() -> None:
    await many_concurrent_requests(100, latency_s=2.0, raw=False)


@pytest.mark.anyio
async def test_hundreds_of_concurrent_raw_requests_are_served() -> None:
    await many_concurrent_requests(500, latency_s=2.0, raw=True)


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_thousand_concurrent_requests_with_two_second_latency() -> None:
    await many_concurrent_requests(2000, latency_s=2.0, raw=True)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_it_also_serves_under_asyncio() -> None:
    async with (
        MockUpstream() as mock,
        httpx.AsyncClient(base_url=mock.base_url, timeout=10) as http,
    ):
        plain = await http.post("/chat/completions", json=chat_body())
        events = await stream_chat(http, chat_body())
        mock.push(Fault.hang())
        with anyio.move_on_after(0.2):
            await http.post("/chat/completions", json=chat_body())
        with anyio.fail_after(5):
            await mock.wait_disconnect(1)
    assert plain.status_code == 200
    assert events[-1] == "[DONE]"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_command_line_prints_one_listening_line_and_serves() -> None:
    cmd = [sys.executable, "-m", "exai.testing.mock_upstream", "--models", "m1,m2"]
    async with await open_process(cmd) as proc:
        try:
            assert proc.stderr is not None
            line = b""
            with anyio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await proc.stderr.receive()
            text = line.decode().strip()
            assert text.startswith("mock-upstream: listening on http://127.0.0.1:")
            assert text.endswith("/v1")
            base_url = text.removeprefix("mock-upstream: listening on ")
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                models = (await http.get("/models")).json()
            assert [m["id"] for m in models["data"]] == ["m1", "m2"]
        finally:
            proc.terminate()
            with anyio.CancelScope(shield=True):
                await proc.wait()


# -- completed answers and the answer gate (scale-out tests) -----------------------------------


@pytest.mark.anyio
async def test_completed_keeps_only_answers_sent_in_full(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    assert (await client.post("/chat/completions", json=chat_body("one"))).status_code == 200
    await stream_chat(client, chat_body("two"))
    mock.push(Fault.status(503))
    assert (await client.post("/chat/completions", json=chat_body("three"))).status_code == 503
    mock.push(Fault.stream_break(2))
    with pytest.raises(httpx.HTTPError):
        await stream_chat(client, chat_body("four"))
    assert [b["messages"][-1]["content"] for b in mock.completed] == ["one", "two"]


@pytest.mark.anyio
async def test_held_answers_stop_before_their_end_until_released(
    mock: MockUpstream, client: httpx.AsyncClient
) -> None:
    mock.hold_answers()
    got: list[list[str]] = []

    async def streamed() -> None:
        got.append(await stream_chat(client, chat_body("held")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(streamed)
        with anyio.fail_after(5):
            while mock.held < 1:
                await anyio.sleep(0.01)
        await anyio.sleep(1.0)  # mock clock: however long, it stays held
        assert got == [] and list(mock.completed) == []
        mock.release_answers()
    assert got[0][-1] == "[DONE]"
    assert mock.held == 0
    assert len(mock.completed) == 1


def test_the_mock_as_a_process_freezes_its_start_up_and_collects_rarely() -> None:
    """``python -m exai.testing.mock_upstream`` (the benchmarks' upstream) shares the machine
    with the daemon it serves: in a storm CPython's default collector policy walked its live
    requests' objects over and over (≈ 28 % of its CPU). In a child process, so this process's
    collector keeps its own policy."""
    script = (
        "import gc, anyio, sys\n"
        "from exai.testing import mock_upstream as m\n"
        "async def stop() -> None:\n"
        "    print(gc.get_threshold(), gc.get_freeze_count() > 0)\n"
        "anyio.sleep_forever = stop\n"
        "m.main(['--port', '0'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split("\n")[0] == f"{mock_upstream.GC_THRESHOLDS} True"


class _Writes:
    """The h11 events of each write of the mock's connections, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[list[Any]] = []
        original = _http.HttpConnection._send

        async def send(conn: _http.HttpConnection, *events: Any) -> None:
            self.writes.append(list(events))
            await original(conn, *events)

        monkeypatch.setattr(_http.HttpConnection, "_send", send)


@pytest.mark.anyio
async def test_a_streamed_answer_goes_out_in_one_write_each_event_its_own_chunk(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to wait for between its events, the head, every event and the end go out
    in one write (the client reads the answer at once, not part by part), and each event is
    still its own chunk of the body: the same bytes as one write per event."""
    writes = _Writes(monkeypatch)
    events = await stream_chat(client, chat_body("one two three four five six"))
    assert len(writes.writes) == 1
    (write,) = writes.writes
    assert isinstance(write[0], h11.Response) and isinstance(write[-1], h11.EndOfMessage)
    pieces = [e.data for e in write[1:-1]]
    assert all(isinstance(e, h11.Data) for e in write[1:-1])
    assert [p.removeprefix(b"data: ").removesuffix(b"\n\n").decode() for p in pieces] == events


@pytest.mark.anyio
async def test_a_held_streamed_answer_writes_up_to_the_gate_then_the_rest(
    mock: MockUpstream, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = _Writes(monkeypatch)
    mock.hold_answers()
    got: list[list[str]] = []

    async def streamed() -> None:
        got.append(await stream_chat(client, chat_body("held")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(streamed)
        with anyio.fail_after(5):
            while mock.held < 1:
                await anyio.sleep(0.01)
        assert len(writes.writes) == 1 and isinstance(writes.writes[0][0], h11.Response)
        assert not isinstance(writes.writes[0][-1], h11.EndOfMessage)
        mock.release_answers()
    assert len(writes.writes) == 2
    # the finish chunk and [DONE], then the end
    assert [type(e) for e in writes.writes[1]] == [h11.Data, h11.Data, h11.EndOfMessage]
    assert got[0][-1] == "[DONE]"


@pytest.mark.anyio
async def test_each_request_starts_one_task_of_the_mock(client: httpx.AsyncClient) -> None:
    """The handler runs in the connection's task; only the watcher of the client going away is
    a task of its own (two before: in a storm the mock shares the cores with the daemon)."""
    started: list[str] = []

    class Spawned(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            started.append(task.name)

    instrument = Spawned()
    trio.lowlevel.add_instrument(instrument)
    try:
        for text in ("one", "two", "three"):
            resp = await client.post("/chat/completions", json=chat_body(text))
            assert resp.status_code == 200
    finally:
        trio.lowlevel.remove_instrument(instrument)
    mine = [name for name in started if "MockUpstream" in name]
    # the connection's task, then one watcher per request
    assert len([n for n in mine if "_watched" in n]) == 3
    assert len(mine) == 4
