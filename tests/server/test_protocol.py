"""The sans-IO JSON-RPC/MCP layer: what each input decodes to, and what each era is answered.

Shapes are checked against the official SDK's own per-version validators (``mcp_types.methods``)
and, end to end, by driving the SDK's ``ClientSession`` against a tiny responder built from
these functions — no sockets.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types
import pytest
from mcp.client._probe import negotiate_auto
from mcp.client.session import ClientSession
from mcp.shared.message import SessionMessage
from mcp_types.jsonrpc import jsonrpc_message_adapter
from mcp_types.methods import validate_server_result

from exai import errors
from exai.server import protocol as p
from exai.tools.base import ToolResult

ENVELOPE = {
    p.PROTOCOL_VERSION_META_KEY: "2026-07-28",
    p.CLIENT_CAPABILITIES_META_KEY: {},
    p.CLIENT_INFO_META_KEY: {"name": "t", "version": "1"},
}


def req(**members: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", **members})


# --------------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("text", "code", "says", "echoed_id"),
    [
        ("", -32700, "line 1, column 1", None),
        ('{"jsonrpc": "2.0", "id": 1,', -32700, "line 1, column 28", 1),
        ('{"a": 1}\n{"b": 2}', -32700, "Extra data at line 2, column 1", None),
        ("NaN", -32700, "NaN is not valid JSON", None),
        ('{"x": Infinity}', -32700, "Infinity is not valid JSON", None),
        ('{"x": 1e999}', -32700, "1e999 is too large", None),
        ("9" * 5000, -32700, "more than 4300 digits", None),
        ("[]", -32600, "batch requests are not supported", None),
        (f"[{req(id=1, method='ping')}]", -32600, "batch requests are not supported", None),
        ('"ping"', -32600, "must be a JSON object, got a string", None),
        ("42", -32600, "must be a JSON object, got an integer", None),
        ("null", -32600, "must be a JSON object, got null", None),
        ('{"id": 1, "method": "ping"}', -32600, "missing 'jsonrpc'", 1),
        ('{"jsonrpc": "1.0", "id": 1, "method": "ping"}', -32600, 'must be "2.0", got "1.0"', 1),
        ('{"jsonrpc": 2.0, "id": "a", "method": "ping"}', -32600, 'must be "2.0", got 2.0', "a"),
        (req(id=7), -32600, "missing 'method'", 7),
        (req(id=7, method=3), -32600, "'method' must be a string, got an integer", 7),
        (req(id=7, method=None), -32600, "'method' must be a string, got null", 7),
        (req(id=7, method="x", params=[1, 2]), -32600, "'params' must be an object", 7),
        (req(id=7, method="x", params="a"), -32600, "named parameters), got a string", 7),
        (req(id=None, method="x"), -32600, "null is not allowed", None),
        (
            req(id=True, method="x"),
            -32600,
            "'id' must be a string or an integer, got a boolean",
            None,
        ),
        (req(id=1.5, method="x"), -32600, "got the number 1.5", None),
        (req(id=1.0, method="x"), -32600, "got the number 1.0", None),
        (req(id=[1], method="x"), -32600, "got an array", None),
        (req(id={"a": 1}, method="x"), -32600, "got an object", None),
        (req(id="x" * 300, method="x"), -32600, "302 bytes long once encoded; at most 256", None),
        (req(id=10**300, method="x"), -32600, "301 bytes long", None),
    ],
)
def test_bad_input_is_answered_with_its_code_a_reason_and_the_id_when_valid(
    text: str, code: int, says: str, echoed_id: Any
) -> None:
    msg = p.decode(text)

    assert isinstance(msg, p.DecodeError)
    assert (msg.code, msg.id) == (code, echoed_id)
    assert says in msg.message


def test_a_parse_error_carries_line_and_column_in_data() -> None:
    msg = p.decode('{\n  "jsonrpc": "2.0",\n  "id": 1\n  "method": "x"}')

    assert isinstance(msg, p.DecodeError)
    assert msg.data == {"reason": "parse_error", "line": 4, "column": 3}


def test_an_invalid_request_names_the_offending_member_in_data() -> None:
    msg = p.decode(req(id=1, method="x", params=[]))

    assert isinstance(msg, p.DecodeError)
    assert msg.data == {"reason": "invalid_request", "field": "params"}


def test_a_100000_deep_array_is_refused_as_too_deeply_nested_without_recursion_error() -> None:
    text = "[" * 100_000 + "]" * 100_000

    msg = p.decode(text)

    assert isinstance(msg, p.DecodeError)
    assert msg.code == -32700
    assert "deeper than the limit of 64" in msg.message


def test_nesting_that_json_can_read_is_still_held_to_the_limit() -> None:
    nested = "[" * 500 + "]" * 500
    msg = p.decode(req(id=1, method="x", params={"a": json.loads(nested)}))

    assert isinstance(msg, p.DecodeError)
    assert "deeper than the limit" in msg.message


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_not() -> None:
    # the message is level 1, params level 2, then three nested arrays: 5 levels
    at_limit = req(id=1, method="x", params={"a": [[[]]]})
    over = req(id=1, method="x", params={"a": [[[[]]]]})

    assert isinstance(p.decode(at_limit, max_depth=5), p.Request)
    assert isinstance(p.decode(over, max_depth=5), p.DecodeError)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    msg = p.decode(req(id=1, method="x", params={"text": "[[[[{{{{" * 100}))

    assert isinstance(msg, p.Request)


def test_an_id_is_measured_in_encoded_bytes() -> None:
    fits = "é" * 127  # 254 bytes of UTF-8 plus two quotes = 256
    too_long = "é" * 128

    assert p.decode(req(id=fits, method="x")) == p.Request(fits, "x", {})
    assert isinstance(p.decode(req(id=too_long, method="x")), p.DecodeError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (req(id=1, method="tools/list"), p.Request(1, "tools/list", {})),
        (req(id="a-1", method="ping", params={}), p.Request("a-1", "ping", {})),
        (req(id=0, method="x", params=None), p.Request(0, "x", {})),
        (req(id=-5, method="x", params={"k": [1]}), p.Request(-5, "x", {"k": [1]})),
        (req(method="notifications/initialized"), p.Notification("notifications/initialized", {})),
        (
            req(method="notifications/cancelled", params={"requestId": 3}),
            p.Notification("notifications/cancelled", {"requestId": 3}),
        ),
        (req(id=4, result={"ok": True}), p.Response(4, {"ok": True}, None)),
        (
            req(id=None, error={"code": -1, "message": "m"}),
            p.Response(None, None, {"code": -1, "message": "m"}),
        ),
        (req(id=1, method="x", extra="ignored"), p.Request(1, "x", {})),
    ],
)
def test_valid_messages_decode_to_their_kind(text: str, expected: Any) -> None:
    assert p.decode(text) == expected


def test_bytes_are_read_as_utf8_and_invalid_utf8_is_a_parse_error() -> None:
    assert p.decode(req(id=1, method="é").encode()) == p.Request(1, "é", {})

    msg = p.decode(b'{"jsonrpc": "2.0", "id": 1, "method": "\xff"}')

    assert isinstance(msg, p.DecodeError)
    assert (msg.code, msg.id) == (-32700, 1)  # the id is recovered by a bounded scan
    assert "not valid UTF-8" in msg.message


def test_a_response_with_a_non_object_error_is_invalid() -> None:
    msg = p.decode(req(id=1, error="boom"))

    assert isinstance(msg, p.DecodeError)
    assert "'error' must be an object" in msg.message


# --------------------------------------------------------------------------------- encode


def test_result_and_error_round_trip_through_encode_and_decode() -> None:
    assert p.decode(p.encode(p.result(9, {"a": "ü"}))) == p.Response(9, {"a": "ü"}, None)
    err = p.error("x", -32601, "method not found", {"reason": "method_not_found"})
    assert p.decode(p.encode(err)) == p.Response("x", None, err["error"])


def test_encode_is_compact_and_keeps_non_ascii() -> None:
    assert p.encode(p.result(1, {"t": "日本"})) == '{"jsonrpc":"2.0","id":1,"result":{"t":"日本"}}'


def test_encode_escapes_a_lone_surrogate_so_the_text_is_valid_utf8() -> None:
    msg = p.decode(req(id="\ud800", method="x"))
    assert isinstance(msg, p.Request)

    text = p.encode(p.result(msg.id, {}))

    text.encode("utf-8")  # would raise if the surrogate were written raw
    assert json.loads(text)["id"] == "\ud800"


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        p.encode(p.result(1, {"x": float("nan")}))


def test_error_omits_data_when_there_is_none() -> None:
    assert p.error(None, -32700, "Parse error") == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error"},
    }


def test_error_from_exception_uses_the_code_message_and_error_data() -> None:
    exc = errors.CircuitOpenError("provider:kimi", retry_after_s=2.5)

    msg = p.error_from_exception(3, exc)

    assert msg["error"] == {
        "code": -32000,
        "message": "circuit breaker 'provider:kimi' is open; retry in 2.500s",
        "data": {"reason": "circuit_open", "retry_after_s": 2.5, "breaker": "provider:kimi"},
    }


def test_a_decode_error_becomes_its_error_response() -> None:
    msg = p.decode(req(id=5, method=1))
    assert isinstance(msg, p.DecodeError)

    assert msg.to_message() == p.error(5, msg.code, msg.message, msg.data)


def test_progress_notification_omits_what_is_unknown() -> None:
    assert p.progress_notification("tok", 1, None, None) == {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "tok", "progress": 1},
    }
    assert p.progress_notification(7, 2, 10, "halfway")["params"] == {
        "progressToken": 7,
        "progress": 2,
        "total": 10,
        "message": "halfway",
    }


# --------------------------------------------------------------------------------- MCP helpers


@pytest.mark.parametrize(
    ("requested", "answered"),
    [
        ("2025-03-26", "2025-03-26"),
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("2024-11-05", "2024-11-05"),
        ("2026-07-28", "2025-11-25"),  # no handshake in that era: counter-offer
        ("1999-01-01", "2025-11-25"),
        (None, "2025-11-25"),
    ],
)
def test_negotiate_version_keeps_a_supported_handshake_version_else_offers_the_latest(
    requested: str | None, answered: str
) -> None:
    assert p.negotiate_version(requested) == answered


@pytest.mark.parametrize("version", p.HANDSHAKE_VERSIONS)
def test_initialize_result_is_valid_for_every_handshake_version(version: str) -> None:
    res = p.initialize_result(version, server_version="0.1.0", instructions="Use chat.")

    validate_server_result("initialize", version, res)
    assert res == {
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "exai", "version": "0.1.0"},
        "instructions": "Use chat.",
    }


def test_initialize_result_omits_instructions_when_there_are_none() -> None:
    assert "instructions" not in p.initialize_result(None, server_version="1")


def test_discover_result_is_a_valid_2026_result_the_sdk_client_adopts() -> None:
    res = p.discover_result(server_name="exai", server_version="0.1.0", instructions="hi")

    validate_server_result("server/discover", "2026-07-28", res)
    parsed = mcp_types.DiscoverResult.model_validate(res)
    assert parsed.supported_versions == ["2026-07-28"]
    assert parsed.instructions == "hi"
    assert res["_meta"][p.SERVER_INFO_META_KEY] == {"name": "exai", "version": "0.1.0"}
    send, receive = anyio.create_memory_object_stream[Any](1)
    with send, receive:
        session = ClientSession(receive, send)
        session.adopt(parsed)
        assert session.protocol_version == "2026-07-28"
        assert session.server_info is not None
        assert session.server_info.name == "exai"


def test_finalize_result_leaves_handshake_results_alone() -> None:
    res = {"tools": []}

    assert p.finalize_result("tools/list", res, modern=False) is res
    assert p.finalize_result("ping", {}, modern=False) == {}


def test_finalize_result_adds_what_2026_requires() -> None:
    info = {"name": "exai", "version": "1"}
    tools = p.finalize_result("tools/list", {"tools": []}, modern=True, server_info=info)
    call = p.finalize_result(
        "tools/call", ToolResult(text="ok").to_mcp(), modern=True, server_info=info
    )
    ping = p.finalize_result("ping", {}, modern=True)

    assert tools == {
        "tools": [],
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {p.SERVER_INFO_META_KEY: info},
    }
    validate_server_result("tools/list", "2026-07-28", tools)
    validate_server_result("tools/call", "2026-07-28", call)
    assert "ttlMs" not in call
    assert ping == {"resultType": "complete"}


def test_finalize_result_keeps_fields_the_handler_set() -> None:
    res = {"tools": [], "ttlMs": 60_000, "_meta": {"x": 1}}

    out = p.finalize_result(
        "tools/list", res, modern=True, server_info={"name": "e", "version": "1"}
    )

    assert out["ttlMs"] == 60_000
    assert out["_meta"] == {"x": 1, p.SERVER_INFO_META_KEY: {"name": "e", "version": "1"}}
    assert res == {"tools": [], "ttlMs": 60_000, "_meta": {"x": 1}}  # input untouched


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, {}),
        ({"_meta": None}, {}),
        ({"_meta": [1]}, {}),
        ({"_meta": {"progressToken": 1}}, {"progressToken": 1}),
    ],
)
def test_request_meta_is_the_meta_object_or_empty(params: dict[str, Any], expected: Any) -> None:
    assert p.request_meta(params) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [("abc", "abc"), (5, 5), (0, 0), (True, None), (1.5, None), (None, None), ([1], None)],
)
def test_progress_token_is_a_string_or_an_integer(token: Any, expected: Any) -> None:
    assert p.progress_token({"_meta": {"progressToken": token}}) == expected


def test_no_progress_token_when_none_was_sent() -> None:
    assert p.progress_token({}) is None


def test_idempotency_key_is_read_from_meta() -> None:
    assert p.idempotency_key({"_meta": {"exai/idempotencyKey": "k-1"}}) == "k-1"
    assert p.idempotency_key({"_meta": {}}) is None
    assert p.idempotency_key({}) is None


@pytest.mark.parametrize(
    ("key", "says"),
    [(5, "must be a string, got an integer"), ("", "got 0"), ("k" * 201, "got 201")],
)
def test_a_malformed_idempotency_key_is_invalid_params_naming_it(key: Any, says: str) -> None:
    with pytest.raises(errors.InvalidParams) as caught:
        p.idempotency_key({"_meta": {"exai/idempotencyKey": key}})

    assert caught.value.field == "_meta.exai/idempotencyKey"
    assert says in caught.value.message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"name": "chat", "arguments": {"prompt": "hi"}}, ("chat", {"prompt": "hi"})),
        ({"name": "version"}, ("version", {})),
        ({"name": "version", "arguments": None}, ("version", {})),
    ],
)
def test_tools_call_params_gives_name_and_arguments(params: dict[str, Any], expected: Any) -> None:
    assert p.tools_call_params(params) == expected


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({}, "name", "missing required field 'name'"),
        ({"name": 3}, "name", "must be a string, got an integer"),
        ({"name": None}, "name", "got null"),
        ({"name": "chat", "arguments": [1]}, "arguments", "must be an object, got an array"),
        ({"name": "chat", "arguments": "x"}, "arguments", "got a string"),
    ],
)
def test_tools_call_params_errors_name_the_field(
    params: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(errors.InvalidParams) as caught:
        p.tools_call_params(params)

    assert caught.value.field == field
    assert caught.value.code == -32602
    assert says in caught.value.message


# --------------------------------------------------------------------------------- eras


def test_the_opening_era_is_modern_only_for_an_enveloped_request_other_than_initialize() -> None:
    assert p.opening_era("server/discover", {"_meta": ENVELOPE}) == "modern"
    assert p.opening_era("tools/list", {"_meta": ENVELOPE}) == "modern"
    assert p.opening_era("initialize", {"_meta": ENVELOPE}) == "handshake"
    assert p.opening_era("tools/list", {"_meta": {"progressToken": 1}}) == "handshake"
    assert p.opening_era("tools/list", {}) == "handshake"


def test_a_handshake_connection_serves_the_negotiated_version() -> None:
    gate = p.EraGate()

    assert gate.admit("initialize", {"protocolVersion": "2025-06-18"}) == "2025-06-18"
    assert gate.admit("tools/list", {}) == "2025-06-18"
    assert (gate.era, gate.modern) == ("handshake", False)


def test_a_handshake_connection_refuses_the_2026_envelope() -> None:
    gate = p.EraGate()
    gate.admit("initialize", {"protocolVersion": "2025-11-25"})

    with pytest.raises(errors.InvalidRequest) as caught:
        gate.admit("tools/list", {"_meta": ENVELOPE})

    assert "handshake era" in caught.value.message


def test_a_modern_connection_serves_each_request_at_its_envelope_version() -> None:
    gate = p.EraGate()

    assert gate.admit("server/discover", {"_meta": ENVELOPE}) == "2026-07-28"
    assert gate.admit("tools/call", {"name": "x", "_meta": ENVELOPE}) == "2026-07-28"
    assert gate.modern


def test_initialize_on_a_modern_connection_is_unsupported_version_naming_the_supported() -> None:
    gate = p.EraGate()
    gate.admit("server/discover", {"_meta": ENVELOPE})

    with pytest.raises(errors.UnsupportedProtocolVersion) as caught:
        gate.admit("initialize", {"protocolVersion": "2025-11-25"})

    assert caught.value.code == -32022
    data = caught.value.to_error_data()
    assert data["supported"] == ["2026-07-28"]
    assert data["requested"] == "2025-11-25"
    mcp_types.UnsupportedProtocolVersionErrorData.model_validate(data)


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        (None, "_meta"),
        ({p.PROTOCOL_VERSION_META_KEY: "2026-07-28"}, f"_meta.{p.CLIENT_CAPABILITIES_META_KEY}"),
        (
            {p.PROTOCOL_VERSION_META_KEY: 2026, p.CLIENT_CAPABILITIES_META_KEY: {}},
            f"_meta.{p.PROTOCOL_VERSION_META_KEY}",
        ),
    ],
)
def test_a_broken_envelope_is_invalid_params_naming_the_key(meta: Any, field: str) -> None:
    with pytest.raises(errors.InvalidParams) as caught:
        p.modern_request_version({"_meta": meta})

    assert caught.value.field == field


def test_an_unknown_envelope_version_is_unsupported_version() -> None:
    gate = p.EraGate()
    meta = {**ENVELOPE, p.PROTOCOL_VERSION_META_KEY: "2027-01-01"}

    with pytest.raises(errors.UnsupportedProtocolVersion) as caught:
        gate.admit("tools/list", {"_meta": meta})

    assert caught.value.to_error_data()["requested"] == "2027-01-01"


# ------------------------------------------------------------------- the SDK, end to end


ECHO_TOOL = {
    "name": "echo",
    "description": "Echo the text back.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
}


async def _respond(
    inbox: anyio.abc.ObjectReceiveStream[SessionMessage],
    outbox: anyio.abc.ObjectSendStream[SessionMessage],
) -> None:
    """A minimal MCP server made only of this module's functions, speaking wire text."""
    gate = p.EraGate()
    info = {"name": "exai", "version": "0.1.0"}
    async for item in inbox:
        msg = p.decode(item.message.model_dump_json(by_alias=True, exclude_none=True))
        if isinstance(msg, p.DecodeError):
            reply = msg.to_message()
        elif isinstance(msg, p.Request):
            try:
                gate.admit(msg.method, msg.params)
                if msg.method == "initialize":
                    res = p.initialize_result(
                        msg.params.get("protocolVersion"), server_version="0.1.0"
                    )
                elif msg.method == "server/discover":
                    res = p.discover_result(server_version="0.1.0")
                elif msg.method == "tools/list":
                    res = {"tools": [ECHO_TOOL]}
                elif msg.method == "tools/call":
                    _, args = p.tools_call_params(msg.params)
                    res = ToolResult(text=str(args.get("text"))).to_mcp()
                else:
                    raise errors.MethodNotFound(f"method not found: {msg.method!r}")
                final = p.finalize_result(msg.method, res, modern=gate.modern, server_info=info)
                reply = p.result(msg.id, final)
            except errors.ExaiError as exc:
                reply = p.error_from_exception(msg.id, exc)
        else:
            continue
        await outbox.send(SessionMessage(jsonrpc_message_adapter.validate_json(p.encode(reply))))


async def _talk(mode: str) -> tuple[str | None, list[str], str]:
    to_server, server_inbox = anyio.create_memory_object_stream[SessionMessage](16)
    server_outbox, from_server = anyio.create_memory_object_stream[SessionMessage](16)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_respond, server_inbox, server_outbox)
        async with ClientSession(from_server, to_server) as session:
            with anyio.fail_after(5):
                if mode == "auto":
                    await negotiate_auto(session)
                else:
                    await session.initialize()
                tools = await session.list_tools()
                called = await session.call_tool("echo", {"text": "hello"})
        tg.cancel_scope.cancel()
    text = called.content[0].text  # type: ignore[union-attr]
    return session.protocol_version, [t.name for t in tools.tools], text


@pytest.mark.anyio
async def test_the_sdk_client_in_auto_mode_speaks_2026_07_28_with_exai() -> None:
    assert await _talk("auto") == ("2026-07-28", ["echo"], "hello")


@pytest.mark.anyio
async def test_the_sdk_client_in_legacy_mode_speaks_the_handshake_era_with_exai() -> None:
    assert await _talk("legacy") == ("2025-11-25", ["echo"], "hello")
