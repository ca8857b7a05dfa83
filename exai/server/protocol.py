"""Sans-IO JSON-RPC 2.0 and MCP: text in, events out; dicts in, text out.

Nothing here touches a socket, a clock or an event loop. The session decodes each WebSocket text
frame with :func:`decode`, which returns exactly one of :class:`Request`, :class:`Notification`,
:class:`Response` (a client's reply to a server request; the daemon ignores these) or
:class:`DecodeError` (what to answer, never an exception). It builds answers with :func:`result`,
:func:`error`, :func:`error_from_exception`, :func:`notification` and turns them into text with
:func:`encode`.

Decoding is hostile-input safe: it never raises, never recurses without a bound (a
100,000-deep ``[[[[…`` is refused in about a millisecond), refuses ``NaN``/``Infinity`` and
numbers that overflow a float, and echoes the request ``id`` in an error only when that id is
itself valid. When the text cannot be decoded at all, the id is looked for by a scan bounded to
the message's ends (:func:`exai.server.idscan.recover_id`), so even a parse error can be matched.

Decoding cost: small and known per byte
=======================================

The cost of reading JSON is mostly the objects it builds, not the parser: a 4 MiB frame of
``[],[],…`` is 1.4 million lists, which every decoder needs about 0.25 s of CPU to build. So
before anything is built, :func:`decode` counts the message's values and measures its nesting
with C-speed byte operations (:func:`_prescan`: counting, ``split``, ``replace``, no Python loop
over the text) and refuses more than ``max_elements`` values or more than ``max_depth`` levels.
What passes is decoded by **msgspec** (the fastest on strings, exact on integers of any size,
strict JSON); what msgspec refuses goes to the standard library, which either reads it as JSON
allows (lone surrogates in ``\\u`` escapes, kept as before) or says exactly where and why not —
a second pass that the scan has already bounded.

Measured (``python -m benchmarks run decoder --full``, CPU ms per 4 MiB frame, best of 7, this
project's 2-vCPU machine; ``benchmarks/README.md``):

====================  ============  ======  =======  ==============
frame                 stdlib (old)  orjson  msgspec  exai decode
====================  ============  ======  =======  ==============
nested groups                1,248     493      693   19 (refused)
tiny arrays                    294     270      276   19 (refused)
tiny strings                    28      20       13    6 (refused)
long integer/float             2–3      ~1      1–2   4–5
lone surrogates                  9   (err)    (err)   11
100,000 deep                   0.0   (err)    (err)   0.8 (refused)
normal 4 MiB prompt              5       4        1   15
====================  ============  ======  =======  ==============

orjson was not chosen: it turns integers above 64 bits into floats without a word (a request
id of ``10**20`` would change meaning), and on the frames that matter it is no faster.

Protocol eras — what exai answers
=================================

exai serves the two eras a current MCP client may speak. A connection's era is decided by its
first request, as the official SDK's dual-era server loop does (:func:`opening_era`): a request
carrying the 2026-07-28 per-request envelope (``params._meta["io.modelcontextprotocol/
protocolVersion"]``) that is not ``initialize`` opens a *modern* connection; anything else opens
a *handshake* one. :class:`EraGate` keeps that decision and vets every later request.

Handshake era (2024-11-05, 2025-03-26, 2025-06-18, 2025-11-25; MCP SDK 1.x, the TypeScript SDK,
most IDEs)
    * ``initialize`` → :func:`initialize_result`: ``protocolVersion`` is the client's version when
      it is one of those four, else ``2025-11-25`` (the spec's counter-offer: the client may then
      disconnect). 2024-11-05 is answered as itself, not counter-offered: its tools are the same,
      and an SDK 1.x client that asked for it refuses any other answer.
      ``capabilities = {"tools": {"listChanged": false}}`` (the tool list is fixed for the
      daemon's life); ``serverInfo = {name, version}``; ``instructions`` when set.
    * ``notifications/initialized`` → nothing. ``ping`` → ``{}`` (exactly empty: the TypeScript
      and Rust SDKs validate empty results strictly).
    * ``tools/list`` → ``{"tools": [...]}``; ``tools/call`` → ``{"content", "isError",
      "structuredContent"?}``. Results are sent as built: :func:`finalize_result` leaves them
      untouched in this era.
    * A later request carrying the 2026 envelope is refused with -32600 (the SDK does the same).

Modern era (2026-07-28; the official Python SDK 2.x probes ``server/discover`` first)
    * ``server/discover`` → :func:`discover_result`: ``supportedVersions = ["2026-07-28"]`` only.
      Handshake versions are deliberately absent: the list says which versions the client may
      stamp on later *per-request* envelopes, and a handshake version cannot be used that way
      (it is reachable only through ``initialize``). This matches the SDK's own server; the SDK
      client adopts the highest modern version it shares and otherwise falls back to
      ``initialize``. Capabilities are the same tools capability (``listChanged`` false: exai
      serves no ``subscriptions/listen``).
    * Every request must carry ``_meta["io.modelcontextprotocol/protocolVersion"]`` and
      ``_meta["io.modelcontextprotocol/clientCapabilities"]`` (-32602 naming the missing key
      otherwise); an unknown version is -32022 with ``data = {"supported": [...], "requested":
      v}``, which the SDK client reads to retry at a mutual version. ``initialize`` on a modern
      connection is -32022 too (the SDK's answer: it tells a client whose probe timed out to
      re-probe instead of failing).
    * Results pass through :func:`finalize_result` (``modern=True``), which adds:
      ``resultType: "complete"`` to every result (required by the 2026-07-28 schema, including
      empty ones); ``ttlMs: 0`` and ``cacheScope: "private"`` to the cacheable results
      (``tools/list``, ``server/discover``: required there; 0 = "immediately stale", because a
      restarted daemon may serve other tools, and private because a deployment may give clients
      different tools); and ``_meta["io.modelcontextprotocol/serverInfo"] = {name, version}``
      (the spec's SHOULD on every result). Fields the handler set win.
    * ``ping`` is gone from 2026-07-28; exai still answers it (``{"resultType": "complete"}``),
      which is harmless and helps hand-written clients.
    * Notifications (``notifications/cancelled``, ``notifications/progress``) are the same in both
      eras and need no envelope.

Error codes
===========

-32700 the text is not JSON (the message says line and column), or nests deeper than the limit,
or holds a number no float can hold. -32600 the JSON is not one JSON-RPC 2.0 message (batches,
wrong ``jsonrpc``, a bad ``id``, ``method`` or ``params``); each message names the member and what
it held. ``params`` that is not an object is -32600 rather than -32602 on purpose: MCP defines every
method's params as a named object, so an array is a malformed envelope refused before any method is
looked up, not a bad argument to one method.
"""

from __future__ import annotations

import hashlib
import json
import json.scanner
import math
import re
import sys
from typing import Any, Final, Literal

import attrs
import msgspec

from exai.errors import ExaiError, InvalidParams, InvalidRequest, UnsupportedProtocolVersion
from exai.server.idscan import recover_id

__all__ = [
    "ARGUMENT_ERRORS_AS_RESULTS_SINCE",
    "CLIENT_CAPABILITIES_META_KEY",
    "CLIENT_INFO_META_KEY",
    "DEFAULT_MAX_ELEMENTS",
    "ELEMENT_COST_BYTES",
    "HANDSHAKE_VERSIONS",
    "HEADER_MISMATCH",
    "IDEMPOTENCY_KEY_META_KEY",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LATEST_HANDSHAKE_VERSION",
    "METHOD_NOT_FOUND",
    "MODERN_VERSION",
    "MODERN_VERSIONS",
    "PARSE_ERROR",
    "PROTOCOL_VERSION_META_KEY",
    "SERVER_INFO_META_KEY",
    "SUPPORTED_VERSIONS",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "DecodeError",
    "EraGate",
    "Notification",
    "Peeked",
    "Request",
    "Response",
    "argument_error_result",
    "call_digest",
    "decode",
    "decode_value",
    "discover_result",
    "encode",
    "encode_reply",
    "error",
    "error_from_exception",
    "finalize_result",
    "has_modern_envelope",
    "idempotency_key",
    "initialize_result",
    "modern_request_version",
    "negotiate_version",
    "notification",
    "opening_era",
    "peek",
    "progress_notification",
    "progress_token",
    "request_meta",
    "result",
    "tools_call_params",
    "unencodable_reply",
]

HANDSHAKE_VERSIONS: Final[tuple[str, ...]] = (
    "2024-11-05",
    "2025-03-26",
    "2025-06-18",
    "2025-11-25",
)
"""Versions reachable through ``initialize``, oldest first."""
MODERN_VERSION: Final = "2026-07-28"
MODERN_VERSIONS: Final[tuple[str, ...]] = (MODERN_VERSION,)
"""Versions spoken through the per-request ``_meta`` envelope (``server/discover``)."""
SUPPORTED_VERSIONS: Final[tuple[str, ...]] = (*HANDSHAKE_VERSIONS, *MODERN_VERSIONS)
LATEST_HANDSHAKE_VERSION: Final = "2025-11-25"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022
#: 2026-07-28 over HTTP: a routing header (``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name``)
#: that says something else than the request's body
HEADER_MISMATCH: Final = -32020

PROTOCOL_VERSION_META_KEY: Final = "io.modelcontextprotocol/protocolVersion"
CLIENT_INFO_META_KEY: Final = "io.modelcontextprotocol/clientInfo"
CLIENT_CAPABILITIES_META_KEY: Final = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_META_KEY: Final = "io.modelcontextprotocol/serverInfo"
IDEMPOTENCY_KEY_META_KEY: Final = "exai/idempotencyKey"
MAX_IDEMPOTENCY_KEY_CHARS: Final = 200

#: Results whose 2026-07-28 schema requires ``ttlMs`` and ``cacheScope``.
_CACHEABLE_METHODS: Final = frozenset(
    {
        "server/discover",
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/read",
        "resources/templates/list",
    }
)

RequestId = str | int

#: Most JSON values one message may hold unless the caller says otherwise
#: (``EXAI_MAX_JSON_ELEMENTS`` in the daemon).
DEFAULT_MAX_ELEMENTS: Final = 100_000


# --------------------------------------------------------------------------------------------
# Decoded messages


@attrs.frozen
class Request:
    """A call that expects an answer. ``params`` is ``{}`` when the message had none.

    ``cost_bytes`` is what the decoded request may hold in memory, an upper bound set by
    :func:`decode`: the frame's bytes plus :data:`ELEMENT_COST_BYTES` per JSON value.
    """

    id: RequestId
    method: str
    params: dict[str, Any] = attrs.field(factory=dict)
    cost_bytes: int = attrs.field(default=0, eq=False, repr=False)


@attrs.frozen
class Notification:
    """A one-way message; it is never answered."""

    method: str
    params: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Response:
    """A client's reply to a request the server sent. The daemon sends none, so it ignores these."""

    id: RequestId | None
    result: Any | None
    error: dict[str, Any] | None


@attrs.frozen
class DecodeError:
    """The text was not one valid JSON-RPC message: answer with :meth:`to_message`.

    ``id`` is the message's id when the id itself was valid, else ``None``.
    """

    id: RequestId | None
    code: int
    message: str
    data: dict[str, Any] | None = None

    def to_message(self) -> dict[str, Any]:
        """The JSON-RPC error response for this failure."""
        return error(self.id, self.code, self.message, self.data)


Message = Request | Notification | Response | DecodeError


class _Refused(Exception):
    """Internal: a decode step found the problem that :func:`decode` reports."""

    def __init__(self, code: int, message: str, data: dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def _reject_constant(name: str) -> Any:
    raise _Refused(
        PARSE_ERROR,
        f"Parse error: {name} is not valid JSON (numbers must be finite)",
        {"reason": "parse_error"},
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(
            PARSE_ERROR,
            f"Parse error: the number {_clip(text, 40)} is too large to represent",
            {"reason": "parse_error"},
        )
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_FAST_DECODE = msgspec.json.Decoder().decode
_FAST_ENCODE = msgspec.json.Encoder().encode
_JSON_TYPE_NAMES: Final = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: Bytes of memory one decoded element may cost beyond its text (a list or dict header and the
#: pointer to it). A request is charged ``len(frame) + ELEMENT_COST_BYTES × elements`` against
#: its session's and the daemon's budgets (:attr:`Request.cost_bytes`).
ELEMENT_COST_BYTES: Final = 64

_BRACKETS: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting_error(max_depth: int) -> _Refused:
    return _Refused(
        PARSE_ERROR,
        f"Parse error: objects/arrays nest deeper than the limit of {max_depth} levels",
        {"reason": "parse_error", "max_depth": max_depth},
    )


def _elements_error(max_elements: int) -> _Refused:
    return _Refused(
        PARSE_ERROR,
        f"Parse error: the message holds more than the limit of {max_elements} JSON values",
        {"reason": "parse_error", "max_elements": max_elements},
    )


def _outside_strings(data: bytes) -> bytes:
    """The text with every string's content dropped (escaped backslashes and quotes first)."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(unescaped.split(b'"')[::2])


#: above this many runs of brackets the depth is measured by stripping levels instead
_MAX_RUNS = 20_000
_RUNS: Final = re.compile(rb"\[+|\]+")


def _nests_deeper(outside: bytes, max_depth: int) -> bool:
    """Whether the brackets of ``outside`` (text outside strings) nest past ``max_depth``.

    No recursion, C-speed steps only, cost bounded by the number of brackets: a run of more
    than ``max_depth`` opening brackets settles it at once; otherwise innermost ``[]`` pairs
    are stripped one level per pass while the brackets form many runs, and once they form few
    the deepest point is found by walking the runs (after ``k`` passes the remaining brackets
    nest exactly ``depth - k`` deep).
    """
    brackets = outside.translate(_BRACKETS, _NOT_BRACKETS)
    if b"[" * (max_depth + 1) in brackets:
        return True
    for level in range(max_depth + 1):
        if not brackets:
            return False
        if brackets.count(b"[]") + brackets.count(b"][") <= _MAX_RUNS:
            depth = deepest = 0
            for run in _RUNS.finditer(brackets):
                if brackets[run.start()] == 0x5B:  # "["
                    depth += run.end() - run.start()
                    deepest = max(deepest, depth)
                else:
                    depth -= run.end() - run.start()
            return deepest > max_depth - level
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether the objects/arrays of valid JSON ``text`` nest deeper than ``max_depth`` (the
    top-level container is level 1)."""
    return _nests_deeper(_outside_strings(text.encode("utf-8", "surrogatepass")), max_depth)


def _prescan(data: bytes, max_depth: int, max_elements: int) -> int:
    """Refuse text that nests deeper than ``max_depth`` or holds more than ``max_elements``
    values, before any decoder builds an object; returns the number of values (an upper bound).

    Only C-speed byte operations, a few passes over the text: count brackets and commas; unless
    that settles it, drop string contents (escaped backslashes and quotes first, then every
    other piece between quotes) and count again; nesting is measured by :func:`_nests_deeper`.
    Values are counted as commas + opening brackets + 1 (every value but the first in a
    container follows a comma): an upper bound that counts an empty container twice.

    Exact for valid JSON. For invalid JSON the answer may be wrong either way, which is safe: a
    refusal refuses invalid text anyway, and text let through stops the decoder at its first
    invalid byte, while the part before it was counted exactly.
    """
    opens = data.count(b"[") + data.count(b"{")
    elements = data.count(b",") + opens + 1
    if opens <= max_depth and elements <= max_elements:
        return elements
    quotes = data.count(b'"')
    # Strings are keys or values, and every key has a value: more than 2 × max_elements
    # strings means more than max_elements values, without splitting millions of pieces.
    if quotes // 2 > 2 * max_elements:
        raise _elements_error(max_elements)
    outside = data
    if quotes:
        outside = _outside_strings(data)
        opens = outside.count(b"[") + outside.count(b"{")
        elements = outside.count(b",") + opens + 1
    # Depth is told first when it is cheap to tell (the more useful message).
    if opens > max_depth and b"[" * (max_depth + 1) in outside:  # a run of nested arrays
        raise _nesting_error(max_depth)
    if elements > max_elements:
        raise _elements_error(max_elements)
    if opens > max_depth and _nests_deeper(outside, max_depth):
        raise _nesting_error(max_depth)
    return elements


def _load_stdlib(text: str, max_depth: int) -> Any:
    """The standard library's decoder: exact messages (line and column) and every value the
    fast decoder refuses but JSON allows (lone surrogates in ``\\u`` escapes, integers over 4,300
    digits refused by name, …). Called only after :func:`_prescan`, so its cost is bounded."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _Refused(
            PARSE_ERROR,
            f"Parse error: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            {"reason": "parse_error", "line": exc.lineno, "column": exc.colno},
        ) from None
    except RecursionError:
        raise _nesting_error(max_depth) from None
    except ValueError:
        # int() refusing a number with thousands of digits (sys.set_int_max_str_digits).
        raise _Refused(
            PARSE_ERROR,
            f"Parse error: a number has more than {sys.get_int_max_str_digits()} digits",
            {"reason": "parse_error"},
        ) from None


def _load(text: str | bytes, max_depth: int, max_elements: int) -> tuple[Any, int]:
    """Decode one frame: the value, and what it costs in memory (bytes, an upper bound)."""
    if isinstance(text, bytes | bytearray):
        data = bytes(text)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refused(
                PARSE_ERROR,
                f"Parse error: the message is not valid UTF-8 (byte {exc.start})",
                {"reason": "parse_error"},
            ) from None
    else:
        data = text.encode("utf-8", "surrogatepass")
    cost = len(data) + ELEMENT_COST_BYTES * _prescan(data, max_depth, max_elements)
    try:
        return _FAST_DECODE(data), cost
    except msgspec.DecodeError:
        # Whatever msgspec refuses (invalid JSON, NaN, 1e999, huge integers, lone surrogates)
        # goes to the standard library, which either reads it as JSON allows or says exactly
        # where and why not.
        return _load_stdlib(text, max_depth), cost


def decode_value(
    text: str | bytes, *, max_depth: int = 64, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[Any, int] | DecodeError:
    """Any JSON value with the limits and the strictness of :func:`decode` (for a door whose
    messages are not JSON-RPC): the value and what it may cost in memory (bytes, an upper
    bound), or the :class:`DecodeError` to answer (never raises)."""
    try:
        return _load(text, max_depth, max_elements)
    except _Refused as exc:
        return DecodeError(None, exc.code, exc.message, exc.data)


def _id_problem(raw: Any, max_id_bytes: int) -> str | None:
    """Why ``raw`` (present) is not a usable request id, or ``None`` when it is."""
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        if raw is None:
            return "'id' must be a string or an integer; null is not allowed in MCP"
        if isinstance(raw, float):
            return f"'id' must be a string or an integer, got the number {raw!r}"
        return f"'id' must be a string or an integer, got {_json_type(raw)}"
    # Most ids are short: one that cannot reach the limit however it is escaped (a character
    # is at most 6 bytes as JSON, ``\uXXXX``; an integer under 2**63 at most 20 characters)
    # is not encoded to be measured.
    if isinstance(raw, str):
        if len(raw) * 6 + 2 <= max_id_bytes:
            return None
    elif max_id_bytes >= 20 and -(2**63) < raw < 2**63:
        return None
    size = len(json.dumps(raw, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > max_id_bytes:
        return f"'id' is {size} bytes long once encoded; at most {max_id_bytes} are accepted"
    return None


_MISSING: Final = object()


def decode(
    text: str | bytes,
    *,
    max_depth: int = 64,
    max_id_bytes: int = 256,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Request | Notification | Response | DecodeError:
    """Turn one frame's text into one message, or into the error to answer it with.

    Args:
        text: one WebSocket text frame or one stdio line. ``bytes`` are read as UTF-8.
        max_depth: deepest nesting of objects/arrays accepted (the message itself is level 1).
        max_id_bytes: longest request id accepted, measured as encoded JSON.
        max_elements: most JSON values (objects, arrays, strings, numbers, literals; keys not
            counted) accepted in one message. Checked with depth before decoding.

    Returns:
        A :class:`Request`, :class:`Notification` or :class:`Response`, or a
        :class:`DecodeError` carrying the JSON-RPC code, a message naming what was wrong, and the
        id when the id itself was valid (so the client can match the error to its request).

    Error handling:
        Never raises for any input: every failure is a :class:`DecodeError`.
    """
    try:
        value, cost = _load(text, max_depth, max_elements)
    except _Refused as exc:
        # an error nobody can match would leave the client waiting: find the id by a scan
        # bounded to the message's ends (exai.server.idscan)
        rid = recover_id(text, max_id_bytes=max_id_bytes)
        return DecodeError(rid, exc.code, exc.message, exc.data)
    return _classify(value, max_id_bytes, cost)


def _invalid(id_: RequestId | None, message: str, field: str | None = None) -> DecodeError:
    data: dict[str, Any] = {"reason": "invalid_request"}
    if field is not None:
        data["field"] = field
    return DecodeError(id_, INVALID_REQUEST, message, data)


def _classify(
    value: Any, max_id_bytes: int, cost: int = 0
) -> Request | Notification | Response | DecodeError:
    if isinstance(value, list):
        return _invalid(
            None,
            "batch requests are not supported: MCP removed JSON-RPC batching in 2025-06-18; "
            "send one message per frame",
        )
    if not isinstance(value, dict):
        return _invalid(None, f"a JSON-RPC message must be a JSON object, got {_json_type(value)}")

    raw_id = value.get("id", _MISSING)
    id_problem = None if raw_id is _MISSING else _id_problem(raw_id, max_id_bytes)
    good_id: RequestId | None = raw_id if raw_id is not _MISSING and id_problem is None else None

    version = value.get("jsonrpc", _MISSING)
    if version is _MISSING:
        return _invalid(good_id, "missing 'jsonrpc' member: it must be \"2.0\"", "jsonrpc")
    if version != "2.0" or not isinstance(version, str):
        shown = _clip(json.dumps(version, ensure_ascii=False), 40)
        return _invalid(good_id, f"'jsonrpc' must be \"2.0\", got {shown}", "jsonrpc")

    method = value.get("method", _MISSING)
    if method is _MISSING:
        if "result" in value or "error" in value:
            return _response(value, raw_id, id_problem)
        return _invalid(good_id, "missing 'method' member: a request needs a method name", "method")
    if not isinstance(method, str):
        return _invalid(good_id, f"'method' must be a string, got {_json_type(method)}", "method")

    params = value.get("params")
    if params is None:
        # Absent is what the spec asks for; null is accepted as absent, which costs nothing.
        params = {}
    elif not isinstance(params, dict):
        return _invalid(
            good_id,
            f"'params' must be an object (MCP uses named parameters), got {_json_type(params)}",
            "params",
        )

    if raw_id is _MISSING:
        return Notification(method, params)
    if id_problem is not None:
        return _invalid(None, id_problem, "id")
    return Request(raw_id, method, params, cost)


def _response(value: dict[str, Any], raw_id: Any, id_problem: str | None) -> Response | DecodeError:
    if raw_id is _MISSING:
        return _invalid(None, "a response needs an 'id' member", "id")
    if raw_id is not None and id_problem is not None:
        return _invalid(None, id_problem, "id")
    err = value.get("error")
    if "error" in value and not isinstance(err, dict):
        return _invalid(raw_id, f"'error' must be an object, got {_json_type(err)}", "error")
    return Response(raw_id, value.get("result"), err)


# --------------------------------------------------------------------------------------------
# Building messages


def result(id: RequestId, result: dict[str, Any]) -> dict[str, Any]:
    """A success response."""
    return {"jsonrpc": "2.0", "id": id, "result": result}


def error(
    id: RequestId | None, code: int, message: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An error response; ``id`` is ``None`` when the request's id could not be read."""
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": err}


def error_from_exception(id: RequestId | None, exc: ExaiError) -> dict[str, Any]:
    """The error response for an exai error: its code, message and ``to_error_data()``."""
    return error(id, exc.code, exc.message, exc.to_error_data())


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A notification (no id, never answered)."""
    return {"jsonrpc": "2.0", "method": method, "params": params}


def progress_notification(
    token: RequestId, progress: float, total: float | None, message: str | None
) -> dict[str, Any]:
    """``notifications/progress`` for the request that carried ``_meta.progressToken = token``."""
    params: dict[str, Any] = {"progressToken": token, "progress": progress}
    if total is not None:
        params["total"] = total
    if message is not None:
        params["message"] = message
    return notification("notifications/progress", params)


def encode(msg: dict[str, Any]) -> str:
    """Compact JSON text for one message, always encodable as UTF-8.

    Non-ASCII is written as is; a string holding a lone surrogate (which a client can send as
    ``"\\ud800"`` and we may echo) would make the text unencodable, so such a message falls back
    to ``\\u`` escapes.

    Encoded by msgspec (C) when a walk of the message (:func:`_plain_json`, far cheaper than
    a second encoding) finds only what JSON has a form for — ``str`` keys, exact ``str``,
    ``int``, ``bool``, ``None``, finite ``float``, ``dict``, ``list``, ``tuple`` — and by the
    standard library otherwise, or when msgspec refuses it (a lone surrogate, an integer past
    64 bits). The walk keeps the standard library's verdict for everything else: msgspec
    *accepts* much JSON has no form for (bytes as base64, sets, datetimes, UUIDs, Decimals,
    enums, dataclass and attrs instances as their fields) and writes NaN and the infinities
    as ``null``, where a result holding them is a bug that must reach the client as
    ``unencodable_result`` (:func:`encode_reply`), never as silently changed data; non-string
    keys are spelt the standard library's way (``1e+16``). The two encoders agree on every
    message the walk passes, number spelling aside (``1e16`` for ``1e+16``).

    Raises:
        ValueError: ``msg`` holds NaN or an infinity (a bug in whoever built it), or is not
            JSON-serialisable (TypeError).
    """
    if _plain_json(msg):
        try:
            return _FAST_ENCODE(msg).decode()
        except (TypeError, ValueError, OverflowError, RecursionError):  # (UnicodeEncodeError too)
            pass
    return _encode_stdlib(msg)


#: the exact types a message may hold for msgspec to write it as the standard library would
_PLAIN_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _plain_json(value: Any) -> bool:
    """Whether ``value`` holds only JSON's own types (exact, not subclasses), finite floats and
    ``str`` keys: what msgspec and the standard library write alike. Iterative, so a deep
    message is no recursion risk; one look per node."""
    stack = [value]
    pop, extend = stack.pop, stack.extend
    scalars, isfinite = _PLAIN_SCALARS, math.isfinite
    while stack:
        node = pop()
        t = type(node)
        if t in scalars:
            continue
        if t is float:
            if not isfinite(node):
                return False
        elif t is dict:
            for key in node:
                if type(key) is not str:
                    return False
            extend(node.values())
        elif t is list or t is tuple:
            extend(node)
        else:
            return False
    return True


def _encode_stdlib(msg: dict[str, Any]) -> str:
    text = json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(msg, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text


def encode_reply(msg: dict[str, Any]) -> str | None:
    """:func:`encode`, for a message whose content came from elsewhere (a tool's result):
    never raises.

    A message that cannot be encoded (NaN, an object JSON has no form for, an integer too long
    to print) is replaced, when it has an ``id``, by the JSON-RPC error for that id
    (``-32603``, ``data.reason = "unencodable_result"``) so the client is answered and the
    connection carries on; a notification that cannot be encoded gives ``None`` (drop it).
    """
    try:
        return encode(msg)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        return unencodable_reply(msg, exc)


def unencodable_reply(msg: dict[str, Any], exc: Exception) -> str | None:
    """What :func:`encode_reply` sends for ``msg``, which failed to encode with ``exc``."""
    if "id" not in msg:
        return None
    rid = msg["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        rid = None
    return encode(
        error(
            rid,
            INTERNAL_ERROR,
            f"the answer could not be encoded as JSON ({type(exc).__name__}); "
            "the call ran, its result is lost",
            {"reason": "unencodable_result"},
        )
    )


_PEEK_CHARS: Final = 4096
_SCAN: Final = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]


@attrs.frozen
class Peeked:
    """What :func:`peek` found: the request id (``None`` if absent or invalid) and the method
    (``None`` if not found in the frame's head)."""

    id: RequestId | None
    method: str | None


def peek(text: str, *, max_id_bytes: int = 256) -> Peeked:
    """The id and method of a frame, found without decoding the whole frame (bounded work).

    Looks at the top-level members within the first 4,096 characters, and for the id at the
    last ones too (:func:`exai.server.idscan.recover_id`). For frames that are answered without
    being decoded (over the message rate): the refusal still carries the request's id.
    """
    head = text[:_PEEK_CHARS]
    found_id: RequestId | None = None
    method: str | None = None
    i = _skip_ws(head, 0)
    if not head.startswith("{", i):
        return Peeked(None, None)
    i += 1
    try:
        while True:
            i = _skip_ws(head, i)
            key, i = _SCAN(head, i)
            i = _skip_ws(head, i)
            if not isinstance(key, str) or not head.startswith(":", i):
                break
            i = _skip_ws(head, i + 1)
            value, i = _SCAN(head, i)
            if key == "id":
                valid = not isinstance(value, bool) and isinstance(value, str | int)
                found_id = value if valid and _id_problem(value, max_id_bytes) is None else None
            elif key == "method" and isinstance(value, str):
                method = value
            i = _skip_ws(head, i)
            if not head.startswith(",", i):
                break
            i += 1
    except (StopIteration, ValueError, RecursionError, _Refused):
        pass
    if found_id is None:
        found_id = recover_id(text, max_id_bytes=max_id_bytes)  # (also looks at the tail)
    return Peeked(found_id, method)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def call_digest(method: str, params: dict[str, Any]) -> str:
    """A digest of what a request asks: its method and its params but ``_meta``.

    The exactly-once key of a call includes it, so a request id reused for another question is
    never answered from the first one. ``_meta`` is left out on purpose: it carries transport
    hints (progress token, protocol envelope, idempotency key) that a client re-sending the same
    question may change. Keys are sorted, so a re-serialised re-send digests the same.
    """
    content = [method, {k: v for k, v in params.items() if k != "_meta"}]
    try:
        blob = msgspec.json.encode(content, order="sorted")
    except (TypeError, ValueError, OverflowError):  # lone surrogates (UnicodeEncodeError), …
        blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------
# MCP


#: From this version on, a tool's argument errors are a tool result with ``isError: true`` (the
#: model can read and correct them); before it, a JSON-RPC error -32602.
ARGUMENT_ERRORS_AS_RESULTS_SINCE: Final = "2025-11-25"


def argument_error_result(error: dict[str, Any], negotiated: str | None) -> dict[str, Any] | None:
    """The ``tools/call`` result that carries a tool's argument error, or ``None`` to answer it
    as the JSON-RPC error it is.

    From 2025-11-25 on (:data:`ARGUMENT_ERRORS_AS_RESULTS_SINCE`, 2026-07-28 included) the spec
    asks that input validation errors be tool results with ``isError: true``; earlier versions,
    and a client that never negotiated one (it skipped ``initialize``), get -32602. An argument
    error is a -32602 about the call's arguments — not an unknown tool (``data.field ==
    "name"``) nor a bad ``_meta`` envelope, which stay protocol errors in every version. The
    result's text is the error's message; ``structuredContent.error`` keeps the whole error
    (``code``, ``message``, ``data`` with ``reason`` and ``field``), so a client can still tell
    what was refused.

    Versions are ``YYYY-MM-DD`` strings, so they compare in time order as strings.
    """
    if negotiated is None or negotiated < ARGUMENT_ERRORS_AS_RESULTS_SINCE:
        return None
    if error.get("code") != INVALID_PARAMS:
        return None
    data = error.get("data")
    field = data.get("field") if isinstance(data, dict) else None
    if isinstance(field, str) and (field == "name" or field.startswith("_meta")):
        return None
    message = error.get("message")
    return {
        "content": [{"type": "text", "text": message if isinstance(message, str) else ""}],
        "isError": True,
        "structuredContent": {"error": error},
    }


def negotiate_version(requested: str | None) -> str:
    """The version answered to ``initialize``: the client's when exai speaks it through the
    handshake, else :data:`LATEST_HANDSHAKE_VERSION` (the spec's counter-offer).

    ``2026-07-28`` is not reachable through ``initialize`` (that era has no handshake), so it too
    gets the counter-offer.
    """
    if isinstance(requested, str) and requested in HANDSHAKE_VERSIONS:
        return requested
    return LATEST_HANDSHAKE_VERSION


def _server_info(name: str, version: str) -> dict[str, Any]:
    return {"name": name, "version": version}


def _capabilities() -> dict[str, Any]:
    return {"tools": {"listChanged": False}}


def initialize_result(
    requested_version: str | None,
    *,
    server_name: str = "exai",
    server_version: str,
    instructions: str | None = None,
) -> dict[str, Any]:
    """The result of ``initialize`` (handshake era)."""
    out: dict[str, Any] = {
        "protocolVersion": negotiate_version(requested_version),
        "capabilities": _capabilities(),
        "serverInfo": _server_info(server_name, server_version),
    }
    if instructions is not None:
        out["instructions"] = instructions
    return out


def discover_result(
    *, server_name: str = "exai", server_version: str, instructions: str | None = None
) -> dict[str, Any]:
    """The complete result of ``server/discover`` (2026-07-28), ready to send.

    Carries every field the 2026-07-28 schema requires (``supportedVersions``, ``capabilities``,
    ``ttlMs``, ``cacheScope``, ``resultType``) and the ``serverInfo`` stamp in ``_meta``, which
    the SDK's ``ClientSession`` reads as the server's identity. Passing it through
    :func:`finalize_result` again changes nothing.
    """
    out: dict[str, Any] = {
        "supportedVersions": list(MODERN_VERSIONS),
        "capabilities": _capabilities(),
    }
    if instructions is not None:
        out["instructions"] = instructions
    return finalize_result(
        "server/discover",
        out,
        modern=True,
        server_info=_server_info(server_name, server_version),
    )


def finalize_result(
    method: str,
    result: dict[str, Any],
    *,
    modern: bool,
    server_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add what the connection's era requires to a method's result (a new dict; fields set win).

    Handshake era: ``result`` unchanged. Modern era (2026-07-28): ``resultType: "complete"`` on
    every result; ``ttlMs: 0`` and ``cacheScope: "private"`` on cacheable results (``tools/list``,
    ``server/discover``, and the prompt/resource lists exai does not serve); and, when
    ``server_info`` (``{"name", "version"}``) is given, ``_meta["io.modelcontextprotocol/
    serverInfo"]``.
    """
    if not modern:
        return result
    out = dict(result)
    out.setdefault("resultType", "complete")
    if method in _CACHEABLE_METHODS:
        out.setdefault("ttlMs", 0)
        out.setdefault("cacheScope", "private")
    if server_info is not None:
        meta = out.get("_meta")
        if meta is None:
            out["_meta"] = {SERVER_INFO_META_KEY: dict(server_info)}
        elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
            out["_meta"] = {**meta, SERVER_INFO_META_KEY: dict(server_info)}
    return out


def request_meta(params: dict[str, Any]) -> dict[str, Any]:
    """``params["_meta"]`` when it is an object, else ``{}``."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta if isinstance(meta, dict) else {}


def progress_token(params: dict[str, Any]) -> RequestId | None:
    """The request's ``_meta.progressToken`` (a string or an integer), or ``None``.

    A token of any other type is ignored: the client then simply gets no progress, which is what
    the spec allows a receiver to do.
    """
    token = request_meta(params).get("progressToken")
    if isinstance(token, bool) or not isinstance(token, str | int):
        return None
    return token


def idempotency_key(params: dict[str, Any]) -> str | None:
    """``params._meta["exai/idempotencyKey"]``: the key the exai bridge sets on a request it may
    re-send after reconnecting, so the daemon answers the re-send from the first attempt.

    Raises:
        InvalidParams: the key is present but is not a non-empty string of at most 200 chars.
            (Silently ignoring it would turn a re-send into a second call.)
    """
    meta = request_meta(params)
    if IDEMPOTENCY_KEY_META_KEY not in meta:
        return None
    key = meta[IDEMPOTENCY_KEY_META_KEY]
    field = f"_meta.{IDEMPOTENCY_KEY_META_KEY}"
    if not isinstance(key, str):
        raise InvalidParams(f"{field}: must be a string, got {_json_type(key)}", field=field)
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidParams(
            f"{field}: must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters long (got {len(key)})",
            field=field,
        )
    return key


def tools_call_params(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The tool name and arguments of a ``tools/call``; ``arguments`` defaults to ``{}``.

    Raises:
        InvalidParams: ``name`` is missing or not a string, or ``arguments`` is not an object;
            ``field`` is ``"name"`` or ``"arguments"``.
    """
    if "name" not in params:
        raise InvalidParams("missing required field 'name' (the tool to call)", field="name")
    name = params["name"]
    if not isinstance(name, str):
        raise InvalidParams(f"name: must be a string, got {_json_type(name)}", field="name")
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    elif not isinstance(arguments, dict):
        raise InvalidParams(
            f"arguments: must be an object, got {_json_type(arguments)}", field="arguments"
        )
    return name, arguments


# --------------------------------------------------------------------------------------------
# Eras


Era = Literal["handshake", "modern"]


def has_modern_envelope(params: dict[str, Any]) -> bool:
    """Whether ``params._meta`` carries the 2026-07-28 protocol-version key.

    The key alone decides (a bare ``_meta`` is no evidence: handshake-era requests carry
    ``progressToken`` there), so a half-built envelope still routes modern and is told what it
    lacks by :func:`modern_request_version`.
    """
    return PROTOCOL_VERSION_META_KEY in request_meta(params)


def opening_era(method: str, params: dict[str, Any]) -> Era:
    """The era a connection's first request opens (``initialize`` is always handshake)."""
    if method != "initialize" and has_modern_envelope(params):
        return "modern"
    return "handshake"


def modern_request_version(params: dict[str, Any]) -> str:
    """Check a 2026-07-28 request's ``_meta`` envelope and return its protocol version.

    Raises:
        InvalidParams: ``_meta`` is not an object or lacks the protocol-version or
            client-capabilities key, or the version is not a string.
        UnsupportedProtocolVersion: the version is not one exai speaks per request (-32022 with
            ``supported`` and ``requested``).
    """
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        raise InvalidParams(
            f"_meta must be an object carrying {PROTOCOL_VERSION_META_KEY!r} and "
            f"{CLIENT_CAPABILITIES_META_KEY!r}",
            field="_meta",
        )
    missing = [
        k for k in (PROTOCOL_VERSION_META_KEY, CLIENT_CAPABILITIES_META_KEY) if k not in meta
    ]
    if missing:
        raise InvalidParams(
            f"_meta is missing the required envelope key(s): {', '.join(missing)}",
            field=f"_meta.{missing[0]}",
        )
    version = meta[PROTOCOL_VERSION_META_KEY]
    if not isinstance(version, str):
        raise InvalidParams(
            f"_meta.{PROTOCOL_VERSION_META_KEY}: must be a string, got {_json_type(version)}",
            field=f"_meta.{PROTOCOL_VERSION_META_KEY}",
        )
    if version not in MODERN_VERSIONS:
        raise UnsupportedProtocolVersion(_clip(version, 64), list(MODERN_VERSIONS))
    return version


@attrs.define
class EraGate:
    """One connection's protocol era: decided by its first request, then enforced.

    Call :meth:`admit` for every request, in arrival order, before dispatching it. It returns the
    protocol version the request is served at, or raises the error to answer it with.

    Attributes:
        era: ``None`` until the first request; then ``"handshake"`` or ``"modern"``.
        version: the version ``initialize`` negotiated (handshake era), or ``None``.
    """

    era: Era | None = None
    version: str | None = None

    def admit(self, method: str, params: dict[str, Any]) -> str:
        """Vet one request and return the version it is served at.

        Raises:
            InvalidRequest: a 2026-07-28 envelope on a handshake connection.
            InvalidParams / UnsupportedProtocolVersion: a bad envelope on a modern connection
                (see :func:`modern_request_version`).
            UnsupportedProtocolVersion: ``initialize`` on a modern connection.
        """
        if self.era is None:
            self.era = opening_era(method, params)
        if self.era == "modern":
            if method == "initialize":
                requested = params.get("protocolVersion")
                raise UnsupportedProtocolVersion(
                    _clip(requested, 64) if isinstance(requested, str) else "",
                    list(MODERN_VERSIONS),
                    "this connection speaks MCP 2026-07-28; the initialize handshake is not "
                    "accepted on it",
                )
            return modern_request_version(params)
        if method == "initialize":
            requested = params.get("protocolVersion")
            self.version = negotiate_version(requested if isinstance(requested, str) else None)
            return self.version
        if has_modern_envelope(params):
            raise InvalidRequest(
                "this connection speaks the handshake era of MCP (it began with initialize); "
                "requests carrying the 2026-07-28 _meta envelope are not accepted on it"
            )
        # Requests before initialize are served at the latest handshake version: strictness
        # here would only break clients that pipeline, and nothing exai serves differs by version.
        return self.version or LATEST_HANDSHAKE_VERSION

    @property
    def modern(self) -> bool:
        """Whether results on this connection need :func:`finalize_result` with ``modern=True``."""
        return self.era == "modern"
