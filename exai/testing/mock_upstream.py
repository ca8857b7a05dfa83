"""A real OpenAI-compatible upstream on loopback, with scripted faults.

Tests and benchmarks point a provider's ``base_url`` at it and script what goes wrong::

    async with MockUpstream(models=("mock-fast", "mock-pro")) as mock:
        client = httpx.AsyncClient(base_url=mock.base_url)
        mock.push(Fault.status(503), times=2)        # the next two chat requests fail
        mock.push(Fault.rate_limited(retry_after_s=2))
        ...
        assert mock.chat_requests[-1].json["model"] == "mock-fast"

Endpoints (``/v1`` prefix optional):

``POST /v1/chat/completions``
    With ``api_key`` set, requires ``Authorization: Bearer <api_key>`` (else 401, code
    ``invalid_api_key``). With ``models`` non-empty and ``strict_models`` (the default), an
    unknown model is a 404 (code ``model_not_found``). A body that is not a chat request is a 400.
    The reply is deterministic: content ``"mock:<model>: "`` + the first 200 characters of the
    last user message; ``usage.prompt_tokens`` = characters of all message contents // 4 + 1,
    ``usage.completion_tokens`` = ``len(content) // 4 + 1``; ``finish_reason`` ``"stop"``; id
    ``chatcmpl-mock-<n>``; ``created`` a fixed time.

    *Reasoning*: a model whose name contains ``thinking``, or a request with
    ``"thinking": {"type": "enabled"}`` (GLM), also gets ``message.reasoning_content`` (streamed
    as ``delta.reasoning_content`` before the content).

    *Kimi web search*: when ``tools`` holds ``{"type": "builtin_function", "function": {"name":
    "$web_search"}}`` and no message has ``role: "tool"``, the reply is ``finish_reason
    "tool_calls"`` with one call ``{"id": "call_ws_1", "type": "builtin_function", "function":
    {"name": "$web_search", "arguments": "{\\"query\\": <last user message>}"}}``. The client
    echoes it back (the assistant message with ``tool_calls``, then a ``role: "tool"`` message
    with that ``tool_call_id`` whose content is the same arguments JSON) and gets a normal reply
    whose content is ``"mock:<model>: web search results for: <last user message>"``. A tool
    message that names an unknown call or does not echo the arguments is a 400.

    *GLM web search*: a tool ``{"type": "web_search", ...}`` adds a top-level ``web_search`` list
    (``title``, ``link``, ``content``, ``media``, ``refer``) to the response (to the first chunk
    when streaming); the content is unchanged.

    *Streaming* (``"stream": true``): ``text/event-stream`` of ``data: <chat.completion.chunk>``
    events — a role chunk, reasoning deltas, the content split at spaces into about 8 deltas (or
    one tool-call delta), and a final chunk with ``finish_reason`` **and ``usage`` (always, with
    or without ``stream_options.include_usage``)** — then ``data: [DONE]``. ``chunk_delay_s``
    waits before each event, and each event is then a write of its own; without a delay (and
    no fault) the head, every event — each its own chunk — and the body's end go out in one
    write (a held answer: up to the gate, then the rest).

``GET /v1/models``
    ``{"object": "list", "data": [{"id": m, "object": "model", "owned_by": "mock"}, ...]}``;
    authenticated like chat.

Anything else is a 404 JSON error; a body over ``max_body_bytes`` is a 413; headers over
``max_header_bytes`` (when set; Kimi rejects about 4 KB) are a 400.

Faults (:class:`Fault`). :meth:`MockUpstream.push` queues faults that the next chat requests
consume one each, first in first out. :meth:`MockUpstream.set_fault` sets a standing fault for
every chat and models request until cleared; :meth:`MockUpstream.fault_for` sets one that
clears itself after a duration (event-loop time). A queued fault wins over the standing one.
Faults act before authentication and validation, like an outage in front of the API.

================================  ===========================================================
``Fault.status(code)``            answer ``code`` with an OpenAI-style error body (with
                                  ``Retry-After`` when ``retry_after_s`` is given)
``Fault.rate_limited(s)``         429, type ``rate_limit_error``, ``Retry-After: s``
``Fault.latency(s)``              wait ``s`` (on top of ``latency_s``), then answer normally
``Fault.reset()``                 close the TCP connection with a reset, no response
``Fault.hang()``                  never answer; the request ends when the client disconnects
``Fault.stream_stall(n)``         send ``n`` SSE events, then nothing until the client leaves
                                  (non-streaming: the headers and half the body, then nothing)
``Fault.stream_break(n)``         send ``n`` SSE events, then close the connection mid-body
                                  (non-streaming: the headers and half the body, then close)
``Fault.malformed()``             200 whose body is not JSON (streaming: a ``data:`` event
                                  that is not JSON, then ``[DONE]``)
================================  ===========================================================

How real providers end an answer (each one has fooled a popular gateway); see the table in
``docs/providers.md`` for what exai makes of each:

=====================================  ======================================================
``Fault.no_done()``                    streaming: every chunk, the last with
                                       ``finish_reason`` and usage, then no ``[DONE]`` and the
                                       connection held open until the client leaves
                                       (non-streaming: a normal answer)
``Fault.error_chunk(n, message,        ``n`` chunks, then one with a top-level ``error``
code)``                                ``{"code", "message"}`` **and**
                                       ``choices[0].finish_reason: "error"`` (OpenRouter), then
                                       ``[DONE]`` (non-streaming: a 200 with both, the content
                                       cut in half)
``Fault.sse_error(n, message, code)``  ``n`` events, then a frame ``event: error`` whose data is
                                       ``{"message", "code"}``, then ``[DONE]``
                                       (non-streaming: as ``error_in_200``)
``Fault.finish(reason, content=,       the answer ends with ``finish_reason: reason``;
reasoning=, cut=)``                    ``content`` / ``reasoning`` replace the text when given
                                       (``""`` = none), ``cut`` halves the content
``Fault.network_error()``              GLM: the content cut in half, ``finish_reason:
                                       "network_error"``
``Fault.content_filtered()``           GLM: empty content, ``finish_reason: "sensitive"``
``Fault.reasoning_exhausted()``        reasoning only, empty content, ``finish_reason:
                                       "length"``
``Fault.error_in_200(status, ...)``    HTTP 200 whose JSON body is only ``{"error": {"message",
                                       "code": status}}`` (``Retry-After`` when given), streamed
                                       or not
``Fault.quota_exhausted()``            Moonshot: 429, type ``exceeded_current_quota_error``,
                                       "insufficient balance", no ``Retry-After``
``Fault.huge_answer(size_bytes)``      an answer of ``size_bytes`` of content, produced lazily
                                       (streaming: ``chunk_bytes`` per chunk)
=====================================  ======================================================

:attr:`MockUpstream.body_bytes_sent` counts the response body bytes handed to the sockets, so a
test can see that a client stopped reading.

:attr:`MockUpstream.completed` keeps the body of every chat request whose answer was sent in
full (its last byte handed to the socket, no fault): what a provider would bill. While
:meth:`MockUpstream.hold_answers` is in force, every normal chat answer stops before its end
(streaming: before the chunk with ``finish_reason``; plain: before the body) until
:meth:`MockUpstream.release_answers`; :attr:`MockUpstream.held` counts the answers waiting, so a
test can act at a moment when no answer is half-way between "sent" and "received".

A client that goes away before its response is complete (during a latency wait, a hang, a
stall or a stream) is noticed at once — a reader watches each connection while its handler
waits — and counted in :attr:`MockUpstream.disconnects`.

Resource handling:
    The server owns a task group for the span of its ``async with``; each connection is one task
    in it and each request in flight adds one watcher task. Leaving the block closes the
    listener and cancels every connection. Recorded requests are kept up to ``max_recorded``
    (oldest dropped first).

Error handling:
    Client misbehaviour is answered over HTTP (400, 404, 413) or ends that connection only. A bug
    in the mock answers 500 and is kept in :attr:`MockUpstream.errors` for the test to assert on.

Command line: ``python -m exai.testing.mock_upstream --port N [--latency-s X] [--api-key K]
[--models a,b]`` (also ``exai mock-upstream``) prints one line
``mock-upstream: listening on http://HOST:PORT/v1`` on stderr and serves until killed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import hmac
import json
import ssl
import sys
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import attrs
import h11
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener

from exai.config import Secret
from exai.testing import _openai
from exai.testing._http import BadRequest, ClientGone, HttpConnection, Request
from exai.testing.mock_args import add_arguments

__all__ = ["Fault", "MockUpstream", "RecordedRequest", "main", "run"]

FaultKind = Literal[
    "status",
    "latency",
    "reset",
    "hang",
    "stream_stall",
    "stream_break",
    "malformed",
    "no_done",
    "error_chunk",
    "sse_error",
    "finish",
    "error_in_200",
    "huge_answer",
]
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
JSON_HEADERS = (("content-type", "application/json"),)
SSE_HEADERS = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))
MALFORMED_BODY = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "tru'
MAX_ERRORS_KEPT = 100
QUOTA_MESSAGE = (
    "Your account org-mock<ak-mock> is suspended due to insufficient balance, please recharge "
    "your account or check your plan and billing details"
)
_Next = Literal["keep", "close", "abort"]


@attrs.frozen(kw_only=True)
class Fault:
    """One scripted misbehaviour of the mock upstream. Build it with the named constructors."""

    kind: FaultKind
    status_code: int = 0
    retry_after_s: float | None = None
    seconds: float = 0.0
    after_chunks: int = 0
    message: str | None = None
    #: the provider's error ``code`` / ``type`` (error faults)
    code: str | int | None = None
    error_type: str | None = None
    #: the answer's ending (``finish``) and its text when replaced (``None`` = as usual)
    finish_reason: str | None = None
    content: str | None = None
    reasoning: str | None = None
    cut: bool = False
    #: ``huge_answer``: bytes of content, and per streamed chunk
    size_bytes: int = 0
    chunk_bytes: int = 16 * 1024

    @classmethod
    def status(
        cls, code: int, *, retry_after_s: float | None = None, message: str | None = None
    ) -> Fault:
        """Answer ``code`` with an OpenAI-style error body (and ``Retry-After`` if given)."""
        if not 400 <= code <= 599:
            raise ValueError(f"a status fault needs a 4xx or 5xx code, not {code}")
        return cls(kind="status", status_code=code, retry_after_s=retry_after_s, message=message)

    @classmethod
    def rate_limited(cls, retry_after_s: float | None = None) -> Fault:
        """429 with ``Retry-After: retry_after_s`` (no header when ``None``)."""
        return cls.status(429, retry_after_s=retry_after_s)

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before answering normally; a client that leaves meanwhile is noticed."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        return cls(kind="latency", seconds=seconds)

    @classmethod
    def reset(cls) -> Fault:
        """Close the TCP connection abruptly (a reset) without any response."""
        return cls(kind="reset")

    @classmethod
    def hang(cls) -> Fault:
        """Never answer; the request ends only when the client disconnects."""
        return cls(kind="hang")

    @classmethod
    def stream_stall(cls, after_chunks: int = 0) -> Fault:
        """Send ``after_chunks`` SSE events, then nothing until the client disconnects."""
        return cls(kind="stream_stall", after_chunks=after_chunks)

    @classmethod
    def stream_break(cls, after_chunks: int = 0) -> Fault:
        """Send ``after_chunks`` SSE events, then close the connection mid-response."""
        return cls(kind="stream_break", after_chunks=after_chunks)

    @classmethod
    def malformed(cls) -> Fault:
        """200 with a body that is not valid JSON."""
        return cls(kind="malformed")

    # -- how real providers end an answer ------------------------------------------------

    @classmethod
    def no_done(cls) -> Fault:
        """Stream every chunk (the last with ``finish_reason`` and usage), then no ``[DONE]``;
        the connection stays open until the client leaves."""
        return cls(kind="no_done")

    @classmethod
    def error_chunk(
        cls,
        after_chunks: int = 2,
        *,
        message: str = "Provider disconnected unexpectedly (mock)",
        code: str | int = "server_error",
    ) -> Fault:
        """OpenRouter's mid-stream error: ``after_chunks`` chunks, then a chunk with a
        top-level ``error`` and ``finish_reason: "error"``, then ``[DONE]``."""
        return cls(kind="error_chunk", after_chunks=after_chunks, message=message, code=code)

    @classmethod
    def sse_error(
        cls,
        after_chunks: int = 2,
        *,
        message: str = "upstream generation failed (mock)",
        code: str | int | None = "server_error",
    ) -> Fault:
        """``after_chunks`` events, then an ``event: error`` frame, then ``[DONE]``."""
        return cls(kind="sse_error", after_chunks=after_chunks, message=message, code=code)

    @classmethod
    def finish(
        cls,
        reason: str,
        *,
        content: str | None = None,
        reasoning: str | None = None,
        cut: bool = False,
    ) -> Fault:
        """End the answer with ``finish_reason: reason``; ``content``/``reasoning`` replace
        its text when given, ``cut`` halves the content."""
        return cls(
            kind="finish", finish_reason=reason, content=content, reasoning=reasoning, cut=cut
        )

    @classmethod
    def network_error(cls) -> Fault:
        """GLM's broken generation: half the content, ``finish_reason: "network_error"``."""
        return cls.finish("network_error", cut=True)

    @classmethod
    def content_filtered(cls) -> Fault:
        """GLM's content filter: empty content, ``finish_reason: "sensitive"``."""
        return cls.finish("sensitive", content="")

    @classmethod
    def reasoning_exhausted(cls) -> Fault:
        """A thinking model that spent its whole budget reasoning: reasoning, no content,
        ``finish_reason: "length"``."""
        return cls.finish(
            "length",
            content="",
            reasoning="mock reasoning that went on until the output budget ran out",
        )

    @classmethod
    def error_in_200(
        cls,
        status: int = 429,
        *,
        message: str = "Rate limit exceeded (mock)",
        retry_after_s: float | None = None,
        code: str | int | None = None,
    ) -> Fault:
        """HTTP 200 whose body is only ``{"error": {"message", "code"}}`` (``code`` defaults to
        ``status``), with ``Retry-After`` when given."""
        return cls(
            kind="error_in_200",
            status_code=status,
            message=message,
            retry_after_s=retry_after_s,
            code=status if code is None else code,
        )

    @classmethod
    def quota_exhausted(cls) -> Fault:
        """Moonshot's 429 "insufficient balance" (type ``exceeded_current_quota_error``), no
        ``Retry-After``: no retry will cure it."""
        return cls(
            kind="status",
            status_code=429,
            message=QUOTA_MESSAGE,
            error_type="exceeded_current_quota_error",
        )

    @classmethod
    def huge_answer(cls, size_bytes: int, *, chunk_bytes: int = 16 * 1024) -> Fault:
        """An answer with ``size_bytes`` of content (``chunk_bytes`` per streamed chunk),
        produced as it is sent."""
        if size_bytes < 1 or chunk_bytes < 1:
            raise ValueError("size_bytes and chunk_bytes must be >= 1")
        return cls(kind="huge_answer", size_bytes=size_bytes, chunk_bytes=chunk_bytes)


@attrs.frozen(kw_only=True)
class RecordedRequest:
    """A request as the mock received it.

    Attributes:
        method: ``"POST"``, ``"GET"``, …
        path: The target without its query string.
        headers: Header names lower-cased; repeated headers joined with ``", "``.
        json: The parsed body, or ``None`` when it is empty or not JSON.
        body: The raw body.
        started_at: ``anyio.current_time()`` when the request was complete.
    """

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    body: bytes
    started_at: float


class MockUpstream:
    """An OpenAI-compatible HTTP/1.1 server on loopback with scripted faults.

    Args:
        models: Model ids it serves and lists.
        api_key: When set, every request needs ``Authorization: Bearer <api_key>``.
        host: Listen address.
        port: Listen port; 0 picks a free one (read :attr:`port`).
        latency_s: Base wait before every chat answer (settable later).
        chunk_delay_s: Wait before each SSE event (settable later).
        strict_models: Answer 404 for a model not in ``models`` (when ``models`` is non-empty).
        max_body_bytes: Larger request bodies get 413.
        max_header_bytes: When set, requests with more header bytes get 400 (Kimi: ~4 KB).
        max_recorded: How many requests :attr:`requests` keeps.
        ssl_context: When set, serve HTTPS with it (a server context, e.g. from ``trustme``);
            :attr:`base_url` then starts with ``https://``.

    Attributes:
        disconnects: Requests whose client went away before the response was complete.
        request_count: Requests received (all routes), including those no longer recorded.
        connections: TCP connections accepted.
        peak_active: The most requests ever handled at the same time.
        errors: Exceptions from bugs in the mock itself (each answered with a 500).
        body_bytes_sent: Response body bytes handed to the sockets, all requests together.
    """

    def __init__(
        self,
        models: Iterable[str] = ("mock-fast", "mock-pro"),
        api_key: str | Secret | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        strict_models: bool = True,
        max_body_bytes: int = 8 * 1024 * 1024,
        max_header_bytes: int | None = None,
        max_recorded: int = 10_000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.models = tuple(models)
        self.ssl_context = ssl_context
        self.api_key = api_key
        self.host = host
        self.latency_s = latency_s
        self.chunk_delay_s = chunk_delay_s
        self.strict_models = strict_models
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.disconnects = 0
        self.request_count = 0
        self.connections = 0
        self.peak_active = 0
        self.body_bytes_sent = 0
        self.errors: list[BaseException] = []
        self._requested_port = port
        self._port = 0
        self._active = 0
        self._completions = 0
        self._script: collections.deque[Fault] = collections.deque()
        self._standing: Fault | None = None
        self._standing_until: float | None = None
        self._recorded: collections.deque[RecordedRequest] = collections.deque(maxlen=max_recorded)
        #: bodies of the chat requests answered in full (see the module docstring)
        self.completed: collections.deque[Any] = collections.deque(maxlen=max_recorded)
        #: answers waiting at the gate of :meth:`hold_answers` right now
        self.held = 0
        self._gate: anyio.Event | None = None
        self._disconnected = anyio.Event()
        self._listener: anyio.abc.Listener[Any] | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    # -- where and what ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (known once the ``async with`` block is entered)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: what an OpenAI client takes as its base URL."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self._port}/v1"

    @property
    def active(self) -> int:
        """Requests being handled right now."""
        return self._active

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (up to ``max_recorded``, oldest first)."""
        return list(self._recorded)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """Only the ``POST /v1/chat/completions`` requests."""
        return [r for r in self._recorded if r.method == "POST" and r.path in CHAT_PATHS]

    @property
    def pending_faults(self) -> tuple[Fault, ...]:
        """The queued faults not consumed yet."""
        return tuple(self._script)

    @property
    def fault(self) -> Fault | None:
        """The standing fault (from :meth:`set_fault` or :meth:`fault_for`), if still in force."""
        if self._standing_until is not None and anyio.current_time() >= self._standing_until:
            self._standing = None
            self._standing_until = None
        return self._standing

    def __repr__(self) -> str:
        return (
            f"<MockUpstream {self.base_url} active={self._active} "
            f"requests={self.request_count} disconnects={self.disconnects} "
            f"queued_faults={len(self._script)}>"
        )

    # -- scripting -----------------------------------------------------------------------

    def push(self, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` chat requests (after those already queued)."""
        if times < 1:
            raise ValueError("times must be >= 1")
        self._script.extend([fault] * times)

    def set_fault(self, fault: Fault | None) -> None:
        """Apply ``fault`` to every request from now on; ``None`` clears it."""
        self._standing = fault
        self._standing_until = None

    def fault_for(self, fault: Fault, duration_s: float) -> None:
        """Apply ``fault`` to every request for ``duration_s`` seconds of event-loop time."""
        self._standing = fault
        self._standing_until = anyio.current_time() + duration_s

    def hold_answers(self) -> None:
        """Stop every normal chat answer before its end until :meth:`release_answers`."""
        if self._gate is None:
            self._gate = anyio.Event()

    def release_answers(self) -> None:
        """Let the answers held by :meth:`hold_answers` finish (and new ones run through)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    async def _at_gate(self) -> None:
        gate = self._gate
        if gate is None:
            return
        self.held += 1
        try:
            await gate.wait()
        finally:
            self.held -= 1

    def clear(self) -> None:
        """Drop queued and standing faults and forget recorded requests and counters."""
        self._script.clear()
        self.set_fault(None)
        self._recorded.clear()
        self.completed.clear()
        self.errors.clear()
        self.disconnects = 0
        self.request_count = 0
        self.connections = 0
        self.peak_active = 0
        self.body_bytes_sent = 0

    async def wait_disconnect(self, n: int = 1) -> None:
        """Wait until :attr:`disconnects` reaches ``n`` (bound it with ``fail_after``)."""
        while self.disconnects < n:
            await self._disconnected.wait()

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> MockUpstream:
        tcp = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self._requested_port, backlog=4096
        )
        self._port = tcp.extra(SocketAttribute.local_port)
        listener: anyio.abc.Listener[Any] = tcp
        if self.ssl_context is not None:
            listener = TLSListener(tcp, self.ssl_context, standard_compatible=False)
        self._listener = listener
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(listener.serve, self._serve_connection, tg)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None and self._listener is not None
        self._tg.cancel_scope.cancel()
        try:
            # The body's own exception (if any) propagates by itself.
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()

    # -- connections ---------------------------------------------------------------------

    async def _serve_connection(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        conn = HttpConnection(
            stream, max_body_bytes=self.max_body_bytes, on_body_bytes=self._count_sent
        )
        how: _Next = "close"
        try:
            while True:
                try:
                    request = await conn.next_request()
                except BadRequest as exc:
                    with contextlib.suppress(h11.LocalProtocolError):
                        await self._send_error(conn, exc.status, exc.message, code="bad_request")
                    break
                if request is None:
                    break
                how = await self._watched(conn, request)
                if how != "keep" or not conn.reusable:
                    break
        except ClientGone:
            pass
        finally:
            if how == "abort":
                await conn.abort()
            else:
                await conn.close()

    async def _watched(self, conn: HttpConnection, request: Request) -> _Next:
        """Handle one request (in this task) while a second task watches for the client going
        away (one task started per request, not two: in a storm the mock shares the machine's
        cores with the daemon it serves)."""
        self._active += 1
        self.peak_active = max(self.peak_active, self._active)
        self.request_count += 1
        outcome: list[_Next] = []
        client_gone = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    nonlocal client_gone
                    await conn.wait_client_gone()
                    if not conn.response_done and not outcome:
                        client_gone = True
                        outcome.append("close")
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    outcome.append(await self._handle(conn, request))
                except ClientGone:
                    if not outcome:
                        client_gone = True
                        outcome.append("close")
                tg.cancel_scope.cancel()
        finally:
            self._active -= 1
        # Counted only once the handler has stopped, so a waiter sees a quiet server.
        if client_gone:
            self._count_disconnect()
        return outcome[0] if outcome else "close"

    def _count_sent(self, n: int) -> None:
        self.body_bytes_sent += n

    def _count_disconnect(self) -> None:
        self.disconnects += 1
        event, self._disconnected = self._disconnected, anyio.Event()
        event.set()

    async def _handle(self, conn: HttpConnection, request: Request) -> _Next:
        body_json: Any = None
        if request.body:
            try:
                body_json = json.loads(request.body)
            except ValueError:
                body_json = None
        self._recorded.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers=request.headers,
                json=body_json,
                body=request.body,
                started_at=anyio.current_time(),
            )
        )
        try:
            if self.max_header_bytes is not None and request.header_bytes > self.max_header_bytes:
                return await self._send_error(
                    conn, 400, "request header too large", code="header_too_large"
                )
            if request.method == "POST" and request.path in CHAT_PATHS:
                return await self._chat(conn, request, body_json)
            if request.method == "GET" and request.path in MODELS_PATHS:
                return await self._list_models(conn, request)
            return await self._send_error(
                conn, 404, f"no route for {request.method} {request.path}", code="not_found"
            )
        except (ClientGone, anyio.get_cancelled_exc_class()):
            raise
        except Exception as exc:  # a bug in the mock: answer 500 and keep it for the test
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(exc)
            if conn.response_started:
                return "abort"
            return await self._send_error(
                conn, 500, f"mock upstream bug: {exc!r}", type_="server_error", code="mock_bug"
            )

    # -- endpoints -----------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        key = self.api_key.reveal() if isinstance(self.api_key, Secret) else self.api_key
        expected = f"Bearer {key}".encode()
        given = request.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, expected)

    async def _unauthorized(self, conn: HttpConnection) -> _Next:
        return await self._send_error(
            conn,
            401,
            "Incorrect API key provided.",
            type_="invalid_request_error",
            code="invalid_api_key",
        )

    async def _list_models(self, conn: HttpConnection, request: Request) -> _Next:
        fault = self.fault
        if fault is not None and fault.kind == "latency":
            await anyio.sleep(fault.seconds)
        if fault is not None:
            outcome = await self._apply_fault(conn, fault, stream=False)
            if outcome is not None:
                return outcome
        if not self._authorized(request):
            return await self._unauthorized(conn)
        data = [{"id": m, "object": "model", "owned_by": "mock"} for m in self.models]
        return await self._send_json(conn, 200, {"object": "list", "data": data})

    async def _chat(self, conn: HttpConnection, request: Request, body: Any) -> _Next:
        fault = self._script.popleft() if self._script else self.fault
        stream = isinstance(body, dict) and body.get("stream") is True
        delay = self.latency_s + (fault.seconds if fault and fault.kind == "latency" else 0.0)
        if delay > 0:
            await anyio.sleep(delay)
        if fault is not None:
            outcome = await self._apply_fault(conn, fault, stream=stream)
            if outcome is not None:
                return outcome
        if not self._authorized(request):
            return await self._unauthorized(conn)
        self._completions += 1
        try:
            reply = _openai.build_reply(body, completion_id=f"chatcmpl-mock-{self._completions}")
        except _openai.RequestError as exc:
            return await self._send_error(
                conn, exc.status, exc.message, type_=exc.type, code=exc.code
            )
        if self.models and self.strict_models and reply.model not in self.models:
            return await self._send_error(
                conn,
                404,
                f"The model `{reply.model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        reply = _shaped(reply, fault)
        if stream:
            return await self._stream(conn, reply, fault, body)
        if fault is not None and fault.kind == "huge_answer":
            return await self._huge_body(conn, reply, fault)
        doc = _openai.reply_json(reply)
        if fault is not None and fault.kind == "error_chunk":
            doc["error"] = _error_member(fault)
            doc["choices"][0]["finish_reason"] = "error"
            message = doc["choices"][0]["message"]
            message["content"] = message["content"][: len(message["content"]) // 2]
        body_bytes = json.dumps(doc).encode()
        partial = fault if fault is not None and fault.kind.startswith("stream_") else None
        if partial is None:
            normal = fault is None or fault.kind == "latency"
            if normal:
                await self._at_gate()
            await conn.send_response(200, JSON_HEADERS, body_bytes)
            if normal:
                self.completed.append(body)
            return "keep"
        await conn.start_response(200, JSON_HEADERS, content_length=len(body_bytes))
        await conn.send_data(body_bytes[: len(body_bytes) // 2])
        return await self._stall_or_break(partial)

    async def _stream(
        self, conn: HttpConnection, reply: _openai.ChatReply, fault: Fault | None, body: Any
    ) -> _Next:
        kind = fault.kind if fault is not None else None
        normal = fault is None or kind == "latency"
        chunks = _openai.reply_chunks(reply)
        events: Iterable[bytes] = [*(_sse(chunk) for chunk in chunks), b"data: [DONE]\n\n"]
        hold = False
        if fault is not None and kind in ("stream_stall", "stream_break"):
            events = list(events)[: fault.after_chunks]
        elif kind == "no_done":
            events = list(events)[:-1]
            hold = True
        elif fault is not None and kind in ("error_chunk", "sse_error"):
            keep = [
                _sse(chunk) for chunk in chunks[: max(0, min(fault.after_chunks, len(chunks) - 1))]
            ]
            if kind == "error_chunk":
                last = dict(chunks[-1])
                last["choices"] = [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]
                last["error"] = _error_member(fault)
                last.pop("usage", None)
                keep.append(_sse(last))
            else:
                # the frame's data is the error itself (no "error" wrapper, no choices)
                frame = json.dumps(_error_member(fault)).encode()
                keep.append(b"event: error\ndata: " + frame + b"\n\n")
            events = [*keep, b"data: [DONE]\n\n"]
        elif fault is not None and kind == "huge_answer":
            events = _huge_events(reply, fault)
        # a normal answer: its last two events (the finish chunk and [DONE]) wait at the gate
        gate_at = len(events) - 2 if normal and isinstance(events, list) else -1
        stops = hold or (fault is not None and kind in ("stream_stall", "stream_break"))
        if self.chunk_delay_s > 0 or not isinstance(events, list):
            await conn.start_response(200, SSE_HEADERS, content_length=None)
            for i, event in enumerate(events):
                if i == gate_at:
                    await self._at_gate()
                if self.chunk_delay_s > 0:
                    await anyio.sleep(self.chunk_delay_s)
                await conn.send_data(event)
            if not stops:
                await conn.end_response()
        elif gate_at >= 0 and self._gate is not None:
            # held: everything before the gate in one write, the rest once it opens
            await conn.send_pieces(events[:gate_at], head=(200, SSE_HEADERS))
            await self._at_gate()
            await conn.send_pieces(events[gate_at:], end=not stops)
        else:
            # Nothing to wait for between the events: the head, every event (each its own
            # chunk, the same bytes as one write per event) and the end go out in one write.
            # Per event, a send of its own cost the mock a system call and woke the client to
            # read a part of the answer (2.3–3 reads of its socket per answer, 1,000 answers
            # at once; one now): in a storm both processes share the machine's cores.
            await conn.send_pieces(events, head=(200, SSE_HEADERS), end=not stops)
        if fault is not None and kind in ("stream_stall", "stream_break"):
            return await self._stall_or_break(fault)
        if hold:
            await anyio.sleep_forever()
        if normal:
            self.completed.append(body)
        return "keep"

    async def _huge_body(
        self, conn: HttpConnection, reply: _openai.ChatReply, fault: Fault
    ) -> _Next:
        doc = _openai.reply_json(attrs.evolve(reply, content=""))
        head, _, tail = json.dumps(doc).encode().partition(b'"content": ""')
        head += b'"content": "'
        tail = b'"' + tail
        await conn.start_response(
            200, JSON_HEADERS, content_length=len(head) + fault.size_bytes + len(tail)
        )
        await conn.send_data(head)
        left = fault.size_bytes
        piece = b"x" * min(fault.chunk_bytes * 4, 256 * 1024)
        while left > 0:
            await conn.send_data(piece[:left])
            left -= len(piece)
        await conn.send_data(tail)
        await conn.end_response()
        return "keep"

    async def _stall_or_break(self, fault: Fault) -> _Next:
        if fault.kind == "stream_stall":
            await anyio.sleep_forever()
        return "close"

    async def _apply_fault(
        self, conn: HttpConnection, fault: Fault, *, stream: bool
    ) -> _Next | None:
        """Act out a terminal fault; ``None`` when the request should go on (latency, stream)."""
        if fault.kind == "status":
            headers: list[tuple[str, str]] = []
            if fault.retry_after_s is not None:
                headers.append(("retry-after", f"{fault.retry_after_s:g}"))
            code = fault.status_code
            if code == 429:
                message, type_, err = (
                    "Rate limit reached (mock)",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                )
            elif code >= 500:
                message, type_, err = (
                    f"Upstream error {code} (mock)",
                    "server_error",
                    "server_error",
                )
            else:
                message, type_, err = (
                    f"Request refused with {code} (mock)",
                    "invalid_request_error",
                    "mock_status",
                )
            err_code: str | None = err
            if fault.error_type is not None:
                type_, err_code = fault.error_type, None
            return await self._send_error(
                conn, code, fault.message or message, type_=type_, code=err_code, headers=headers
            )
        if fault.kind == "error_in_200" or (fault.kind == "sse_error" and not stream):
            headers = []
            if fault.retry_after_s is not None:
                headers.append(("retry-after", f"{fault.retry_after_s:g}"))
            return await self._send_json(conn, 200, {"error": _error_member(fault)}, headers)
        if fault.kind == "reset":
            return "abort"
        if fault.kind == "hang":
            await anyio.sleep_forever()
        if fault.kind == "malformed":
            if stream:
                await conn.start_response(200, SSE_HEADERS, content_length=None)
                await conn.send_data(b"data: " + MALFORMED_BODY + b"\n\n")
                await conn.send_data(b"data: [DONE]\n\n")
                await conn.end_response()
                return "keep"
            await conn.send_response(200, JSON_HEADERS, MALFORMED_BODY)
            return "keep"
        return None

    # -- responses -----------------------------------------------------------------------

    async def _send_json(
        self,
        conn: HttpConnection,
        status: int,
        doc: Any,
        headers: Sequence[tuple[str, str]] = (),
    ) -> _Next:
        await conn.send_response(status, [*JSON_HEADERS, *headers], json.dumps(doc).encode())
        return "keep"

    async def _send_error(
        self,
        conn: HttpConnection,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> _Next:
        doc = _openai.error_body(message, type_=type_, code=code)
        return await self._send_json(conn, status, doc, headers)


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _error_member(fault: Fault) -> dict[str, Any]:
    member: dict[str, Any] = {"message": fault.message or "error (mock)", "code": fault.code}
    if fault.error_type is not None:
        member["type"] = fault.error_type
    return member


def _shaped(reply: _openai.ChatReply, fault: Fault | None) -> _openai.ChatReply:
    """The reply as a ``finish`` fault reshapes it (its ending and text)."""
    if fault is None or fault.kind != "finish":
        return reply
    content = reply.content if fault.content is None else fault.content
    if fault.cut:
        content = content[: len(content) // 2]
    reasoning = reply.reasoning_content if fault.reasoning is None else (fault.reasoning or None)
    return attrs.evolve(
        reply,
        content=content,
        reasoning_content=reasoning,
        finish_reason=fault.finish_reason or reply.finish_reason,
    )


def _huge_events(reply: _openai.ChatReply, fault: Fault) -> Iterator[bytes]:
    """The SSE events of a ``huge_answer``, made as they are sent (bounded memory)."""
    first, *_, last = _openai.reply_chunks(attrs.evolve(reply, content="x"))
    yield _sse(first)
    body = dict(first)
    body.pop("web_search", None)
    left = fault.size_bytes
    while left > 0:
        n = min(left, fault.chunk_bytes)
        body["choices"] = [{"index": 0, "delta": {"content": "x" * n}, "finish_reason": None}]
        yield _sse(body)
        left -= n
    yield _sse(last)
    yield b"data: [DONE]\n\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m exai.testing.mock_upstream [options]``: :func:`run` with the options of
    :mod:`exai.testing.mock_args` (``exai mock-upstream`` takes the same ones)."""
    parser = argparse.ArgumentParser(
        prog="python -m exai.testing.mock_upstream",
        description="An OpenAI-compatible mock upstream on loopback (for tests and benchmarks).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


#: the mock process's collector thresholds (young allocations, young collections per middle one,
#: middle collections per full one): see :func:`_storm_gc_policy`
GC_THRESHOLDS = (50_000, 20, 100)


def _storm_gc_policy() -> None:
    """The mock as a process (not in a test's process): what start-up loaded is frozen, and the
    collector runs far less often than CPython's default (700, 10, 10).

    A storm holds thousands of requests at once, and under the default policy the collector
    walked their objects again and again — full collections included — ≈ 28 % of the mock's CPU
    while 2,000 requests came in (py-spy ``--native``, *slow_upstream*'s intake). The mock
    shares the benchmark machine's cores with the daemon it serves; a real upstream does not.
    The garbage cycles requests leave (≈ 70 objects a request, counted with the provider pool
    and the mock in one process) are still freed by the young collections; what is left out is
    walking the live requests' objects over and over.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(args: argparse.Namespace) -> int:
    """Serve a mock upstream until killed; ``args`` holds the options of
    :func:`exai.testing.mock_args.add_arguments`."""
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())

    async def serve() -> None:
        async with MockUpstream(
            models=models,
            api_key=args.api_key,
            host=args.host,
            port=args.port,
            latency_s=args.latency_s,
            chunk_delay_s=args.chunk_delay_s,
            strict_models=not args.any_model,
        ) as mock:
            _storm_gc_policy()
            print(f"mock-upstream: listening on {mock.base_url}", file=sys.stderr, flush=True)
            await anyio.sleep_forever()

    try:
        anyio.run(serve, backend="trio")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
