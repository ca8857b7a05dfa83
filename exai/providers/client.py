"""The one OpenAI-compatible HTTP client, and the one place where HTTP errors become exai errors.

:class:`OpenAIClient` talks to one provider over its own bounded connection pool
(:class:`~exai.providers.transport.H11Pool`, whose docstring says why it is not
``httpx.AsyncClient``'s; failures are httpx's exception types either way):
``POST /chat/completions`` (plain or SSE-streamed) and ``GET /models``. It knows nothing about
buckets, breakers or fallbacks; :class:`exai.providers.provider.Provider` puts those around it.

Error mapping (:func:`map_transport_error`, :func:`map_status`; error documents and endings are
read by :mod:`exai.providers.ending`, the one place that decides how an answer ended)::

    httpx.TimeoutException (connect, write, pool), ConnectError, RemoteProtocolError,
    ReadError, WriteError, DecodingError
                                    → UpstreamRetryableError
    a quota / balance code          → UpstreamQuotaExhausted       (never retried; provider held)
    401, 403                        → UpstreamAuthError           (never retried)
    429                             → UpstreamRateLimited          (retry_after_s from Retry-After)
    408, 5xx                        → UpstreamRetryableError
    400, 404, 413, 422, other 4xx   → UpstreamBadRequest
    3xx, bad JSON, wrong shape      → UpstreamMalformedResponse
    no bytes for stall_timeout_s    → UpstreamRetryableError("… stalled: no data for Xs")
    an answer over max_answer_bytes → AnswerTooLarge               (the read stops there)
    a 200 that is not a complete answer (error inside, no / bad finish reason, empty)
                                    → see exai.providers.ending

The request body is encoded here, before any byte is sent: a body that is not valid UTF-8 (a
lone surrogate in a prompt) is the caller's :class:`~exai.errors.InvalidParams`, never an
exception from inside httpx that a breaker would count.

Keys: the ``Authorization`` header is built per request from ``ProviderSettings.api_key`` (so a
rotated key takes effect on the next request; the pool's cached request heads, which hold it,
are dropped when the settings are replaced), sent only to this provider's base URL (redirects
are never followed), never logged, and scrubbed from any text a provider echoes back.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import anyio
import anyio.to_thread
import httpx
import msgspec

from exai.config import ProviderSettings
from exai.errors import (
    AnswerTooLarge,
    InvalidParams,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamRetryableError,
)
from exai.providers.ending import (
    MAX_ERROR_TEXT,
    Ended,
    ErrorDoc,
    answer_bytes,
    error_for,
    judge,
    read_error_doc,
)
from exai.providers.sse import SSEDecoder, StreamAssembler
from exai.providers.transport import H11Pool, Pacer, PoolStatistics, Response
from exai.providers.types import unencodable_field
from exai.resilience import loop as aio

__all__ = [
    "ChunkCallback",
    "OpenAIClient",
    "encode_body",
    "loads",
    "map_status",
    "map_transport_error",
    "parse_retry_after",
]

#: The largest non-streamed response body accepted (a real completion is far smaller).
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Bytes of a non-2xx body read for its error message and code.
MAX_ERROR_BODY_BYTES = 64 * 1024
#: ``Settings.max_answer_bytes``'s default, for a client built without settings.
DEFAULT_MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: Once every choice has a finish reason, how long to wait for the usage chunk and ``[DONE]``
#: before ending the read (some providers never send ``[DONE]`` and hold the connection open).
FINISH_GRACE_S = 1.0
#: Retry-After values are clamped to this (a provider asking for a day is treated as an hour).
MAX_RETRY_AFTER_S = 3600.0

_SSE = b"text/event-stream"
_JSON = b"application/json"

#: a response of either kind (exai's pool, or httpx over an injected transport)
_Response = Response | httpx.Response

ChunkCallback = Callable[[str, str], Awaitable[None]]
"""Called with (content delta, reasoning delta) for each streamed chunk that carries text."""


_ssl_context: ssl.SSLContext | None = None


def _make_ssl_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


async def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context (certifi's CA bundle) for every provider client.

    Building it reads and parses the CA bundle (tens of milliseconds), so it is built once, in
    a worker thread, instead of by each ``httpx.AsyncClient`` on the event loop.
    """
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = await anyio.to_thread.run_sync(_make_ssl_context)
    return _ssl_context


def host_of(url: str) -> str:
    """The host (and port) of a URL, for display: never a path, query or credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def parse_retry_after(headers: httpx.Headers | dict[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date)."""
    h = {k.lower(): v for k, v in headers.items()}
    raw_ms = h.get("retry-after-ms")
    if raw_ms:
        try:
            return _clamp(float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = h.get("retry-after")
    if not raw:
        return None
    try:
        return _clamp(float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    # An HTTP date is wall-clock by definition; this is the one place wall time is read.
    return _clamp(when.timestamp() - time.time())


#: (one encoder, made once: ``json.dumps`` with any option builds a new one per call)
_BODY_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def encode_body(body: dict[str, Any]) -> bytes:
    """``body`` as UTF-8 JSON.

    Raises:
        InvalidParams: a string in it is not valid Unicode (a lone surrogate such as
            ``"\\ud800"``); ``field`` names it (``messages[1].content``).
    """
    try:
        return _BODY_ENCODER.encode(body).encode("utf-8")
    except UnicodeEncodeError:
        where = unencodable_field(body.get("messages") or ()) or ("messages", -1)
        field, pos = where
        raise InvalidParams(
            f"{field} is not valid Unicode text (a lone surrogate"
            + (f" at character {pos}" if pos >= 0 else "")
            + "); nothing was sent to the provider",
            field=field,
        ) from None
    except ValueError as exc:  # NaN / Infinity in a number
        raise InvalidParams(f"the request cannot be sent as JSON: {exc}") from None


_decoder = msgspec.json.Decoder()


def loads(data: str | bytes) -> Any:
    """``json.loads``, in C where it can be: msgspec decodes what it accepts to the same values
    (it refuses NaN, Infinity, out-of-range floats and lone surrogates, which ``json`` takes);
    anything it refuses goes to ``json.loads``, so the result and the errors are json's. Every
    document a provider sends is read with it: one nested deeper than the interpreter's
    recursion limit (``[`` × 100,000 in a stream chunk, an error body or a tool call's
    arguments) is a ``ValueError`` like any other malformed JSON, not a ``RecursionError``
    that no caller expects (it failed the call as an internal error of the tool).

    Raises:
        ValueError: not JSON, or nested too deeply to decode.
    """
    try:
        try:
            return _decoder.decode(data)
        except msgspec.DecodeError:
            return json.loads(data)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to decode") from None


class _StreamRead:
    """Where the read of one streamed answer is: its decoder and assembler, when the grace
    after the last finish reason ends (``None`` until every choice finished) and how the read
    stopped (``None`` while it runs, and when a stall ended it)."""

    __slots__ = ("asm", "decoder", "ended", "grace_until")

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.asm = StreamAssembler()
        self.grace_until: float | None = None
        self.ended: Ended | None = None


def _content_type(response: _Response) -> str:
    """The response's ``Content-Type`` as ``response.headers.get("content-type", "")`` gives
    it, read from the head of the pool's own response when it has the header once, in ASCII
    (almost always), without building the response's headers object for it."""
    if isinstance(response, Response):
        values = [value for name, value in response.raw_headers if name == b"content-type"]
        if len(values) == 1 and values[0].isascii():
            return values[0].decode("ascii")
    return str(response.headers.get("content-type", ""))


def _clamp(v: float) -> float | None:
    if math.isnan(v):
        return None
    return min(max(v, 0.0), MAX_RETRY_AFTER_S)


def _error_doc(body: bytes) -> ErrorDoc:
    """The error document of a non-2xx body (JSON or not)."""
    try:
        data = loads(body)
    except (ValueError, UnicodeDecodeError):
        return ErrorDoc(message=body[:MAX_ERROR_TEXT].decode("utf-8", errors="replace"))
    doc = read_error_doc(data) if isinstance(data, dict) and "error" in data else None
    if doc is None and isinstance(data, dict) and "message" in data:
        doc = read_error_doc(data)
    return doc or ErrorDoc(message="")


def map_status(
    provider: str, status: int, headers: httpx.Headers, body: bytes, secret: str | None = None
) -> UpstreamError:
    """The exai error for a non-2xx HTTP answer (see :func:`exai.providers.ending.error_for`)."""
    return error_for(
        provider,
        _error_doc(body),
        http_status=status,
        retry_after_s=parse_retry_after(headers),
        secret=secret,
    )


def _sse_error(data: str) -> ErrorDoc:
    """The error document of an SSE ``event: error`` frame (JSON or plain text)."""
    try:
        parsed = loads(data)
    except ValueError:
        return ErrorDoc(message=data[:MAX_ERROR_TEXT])
    return read_error_doc(parsed) or ErrorDoc(message=data[:MAX_ERROR_TEXT])


def map_transport_error(provider: str, exc: httpx.HTTPError) -> UpstreamError:
    """The exai error for a failure below HTTP (connect, reset, protocol, timeout)."""
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        what = "cannot be reached"
    else:
        what = "broke the connection"
    return UpstreamRetryableError(
        f"provider {provider!r} {what} ({kind})", provider=provider, data={"transport": kind}
    )


def _validate_completion(provider: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UpstreamMalformedResponse(
            f"provider {provider!r} answered with a body that is not a JSON object",
            provider=provider,
        )
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamMalformedResponse(
            f"provider {provider!r} answered without choices", provider=provider
        )
    msg = choices[0].get("message")
    if not isinstance(msg, dict):
        raise UpstreamMalformedResponse(
            f"provider {provider!r} answered without a message", provider=provider
        )
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        raise UpstreamMalformedResponse(
            f"provider {provider!r} answered with non-text content", provider=provider
        )
    usage = data.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise UpstreamMalformedResponse(
            f"provider {provider!r} answered with a malformed usage", provider=provider
        )
    return data


class OpenAIClient:
    """One provider's HTTP side: a bounded connection pool and the OpenAI wire format.

    Use as an async context manager; the pool is closed on exit.

    Args:
        settings: the provider; read on every request (``base_url`` and ``pool_max`` fixed at
            open).
        transport: an httpx transport to use instead of the network (unit tests); requests
            then go through one ``httpx.AsyncClient`` over it.
        max_answer_bytes: the largest answer (content, reasoning and tool-call arguments, in
            UTF-8 bytes) read; past it the read stops with ``AnswerTooLarge``.

    Resource handling:
        At most ``settings.pool_max`` connections, in one
        :class:`~exai.providers.transport.H11Pool` (its module docstring says why not
        ``httpx.AsyncClient``'s own pool, with the measurements): connecting is bounded by
        ``connect_timeout_s``, writing a request and waiting for a free connection by
        ``stall_timeout_s``. A cancelled call closes its response, and with it the connection,
        before the cancellation propagates: the upstream sees the disconnect and stops
        generating.
    """

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self._pool: H11Pool | None = None
        self.settings = settings
        self.name = settings.name
        #: the largest answer read (``Settings.max_answer_bytes``); settable on reload
        self.max_answer_bytes = max_answer_bytes
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._pace: Pacer | None = None

    @property
    def settings(self) -> ProviderSettings:
        """The provider's settings; replaced on reload (a rotated key is sent from the next
        request on)."""
        return self._settings

    @settings.setter
    def settings(self, settings: ProviderSettings) -> None:
        self._settings = settings
        if self._pool is not None:
            # The pool's cached request heads hold the key they were sent with: dropped, so a
            # rotated key does not stay in memory (kept, it stayed until 64 heads had come).
            self._pool.forget_heads()

    @property
    def pace(self) -> Pacer | None:
        """Whose turn each read of an answer takes once its bytes are there (see
        :attr:`~exai.providers.transport.H11Pool.pace`; not on an httpx ``transport``)."""
        return self._pace

    @pace.setter
    def pace(self, pace: Pacer | None) -> None:
        self._pace = pace
        if self._pool is not None:
            self._pool.pace = pace

    async def __aenter__(self) -> OpenAIClient:
        s = self.settings
        base = s.base_url.rstrip("/") + "/"
        if self._transport is not None:
            http = httpx.AsyncClient(
                base_url=base,
                timeout=httpx.Timeout(None, connect=s.connect_timeout_s),
                follow_redirects=False,
                transport=self._transport,
                headers={"user-agent": "exai"},
                trust_env=False,
            )
            await http.__aenter__()
            self._http = http
            return self
        context: ssl.SSLContext | None = None  # plain http: no TLS, no context to build
        if base.lower().startswith("https:"):
            context = await shared_ssl_context()
        pool = H11Pool(
            base,
            max_connections=max(1, s.pool_max),
            connect_timeout_s=s.connect_timeout_s,
            write_timeout_s=s.stall_timeout_s,
            pool_timeout_s=s.stall_timeout_s,
            keepalive_expiry_s=30.0,
            ssl_context=context,
            headers={"user-agent": "exai", "accept-encoding": "gzip, deflate"},
        )
        await pool.__aenter__()
        pool.pace = self._pace
        self._pool = pool
        return self

    async def __aexit__(self, *exc: object) -> None:
        pool, self._pool = self._pool, None
        http, self._http = self._http, None
        with aio.cancel_scope(shield=True):
            if pool is not None:
                await pool.__aexit__(None, None, None)
            if http is not None:
                await http.__aexit__(None, None, None)

    def pool_statistics(self) -> PoolStatistics | None:
        """The connection pool's counts (``None`` with an injected transport or once closed)."""
        return self._pool.statistics() if self._pool is not None else None

    async def _open(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> Response | httpx.Response:
        """Send a request; the response once its head arrived (its body not read yet).

        Both kinds of response offer ``status_code``, ``headers``, ``aiter_bytes()`` and
        ``aclose()``; the caller must close it.

        Raises:
            httpx.HTTPError: a transport failure (see :mod:`exai.providers.transport`).
        """
        pool = self._pool
        if pool is not None:
            return await pool.request(method, path, headers, body)
        http = self._http
        if http is None:
            raise RuntimeError(f"client for provider {self.name!r} is not open")
        request = http.build_request(
            method, path, content=body or None, headers=[(k, v) for k, v in headers]
        )
        return await http.send(request, stream=True)

    # ------------------------------------------------------------------------------------
    def _headers(self, streaming: bool, *, body: bool = False) -> list[tuple[bytes, bytes]]:
        # Small on purpose: Kimi rejects a request whose headers exceed ~4 KB.
        h = [(b"accept", _SSE if streaming else _JSON)]
        if body:
            h.append((b"content-type", _JSON))
        key = self.settings.api_key
        if key:
            h.append((b"authorization", b"Bearer " + key.reveal().encode("latin-1")))
        return h

    def _secret(self) -> str | None:
        key = self.settings.api_key
        return key.reveal() if key else None

    async def chat(
        self, body: dict[str, Any], *, on_chunk: ChunkCallback | None = None
    ) -> dict[str, Any]:
        """``POST /chat/completions``; returns a complete ``chat.completion`` object.

        With ``body["stream"]`` true the answer is read as SSE, ``on_chunk`` is called for
        each chunk with text, and the chunks are assembled into one completion. Either way
        :func:`exai.providers.ending.judge` decides whether the answer is complete; only a
        complete one is returned.

        Raises:
            InvalidParams: the body cannot be encoded as UTF-8 JSON (a lone surrogate); nothing
                was sent.
            UpstreamError: a subclass per the table in the module docstring and in
                :mod:`exai.providers.ending`; :class:`~exai.errors.AnswerTooLarge` past
                ``max_answer_bytes``.
        """
        streaming = bool(body.get("stream"))
        content = encode_body(body)
        headers = self._headers(streaming, body=True)
        try:
            if streaming:
                return await self._send_streaming(headers, content, on_chunk)
            return await self._send_plain(headers, content)
        except httpx.HTTPError as exc:
            raise map_transport_error(self.name, exc) from None

    async def _send_plain(
        self, headers: list[tuple[bytes, bytes]], content: bytes
    ) -> dict[str, Any]:
        response = await self._open("POST", "chat/completions", headers, content)
        try:
            if not 200 <= response.status_code < 300:
                self._raise_for_status(response, await self._read_error_body(response))
            body = await self._read_body(response, self._answer_body_limit, answer=True)
        finally:
            await response.aclose()
        return self._plain_completion(response, body)

    @property
    def _answer_body_limit(self) -> int:
        # JSON escapes at most 6 wire bytes per byte of text (a control character as \u00XX)
        return 6 * self.max_answer_bytes + 64 * 1024

    def _too_large(self) -> AnswerTooLarge:
        cap = self.max_answer_bytes
        return AnswerTooLarge(
            f"provider {self.name!r} sent an answer larger than {cap} bytes "
            "(EXAI_MAX_ANSWER_BYTES); the read was stopped there",
            provider=self.name,
            data={"limit_bytes": cap, "ending": "too_large"},
        )

    def _plain_completion(self, response: _Response, body: bytes) -> dict[str, Any]:
        """A whole (non-SSE) 2xx body → a complete completion, or the error it stands for."""
        try:
            data = loads(body)
        except ValueError:
            raise UpstreamMalformedResponse(
                f"provider {self.name!r} answered with a body that is not JSON",
                provider=self.name,
            ) from None
        retry_after = parse_retry_after(response.headers)
        doc = read_error_doc(data["error"]) if isinstance(data, dict) and "error" in data else None
        if doc is not None:
            # an error inside a 200: the provider's message and code, never "no choices"
            raise error_for(
                self.name,
                doc,
                retry_after_s=retry_after,
                secret=self._secret(),
                where="inside an HTTP 200 answer",
            )
        completion = _validate_completion(self.name, data)
        if answer_bytes(completion["choices"][0]["message"]) > self.max_answer_bytes:
            raise self._too_large()
        judge(self.name, completion, ended="body", secret=self._secret())
        return completion

    async def _read_body(
        self, response: _Response, limit: int = MAX_BODY_BYTES, *, answer: bool = False
    ) -> bytes:
        """The whole body, at most ``limit`` bytes (past it: ``AnswerTooLarge`` for an answer,
        else malformed), with no gap longer than ``stall_timeout_s`` between chunks."""
        buf = bytearray()
        chunks = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
        async with contextlib.aclosing(chunks):
            while True:
                chunk: bytes | None = None
                with aio.move_on_after(self.settings.stall_timeout_s):
                    chunk = await anext(chunks, b"")
                if chunk is None:
                    raise self._stalled(f"after {len(buf)} bytes of the body")
                if not chunk:
                    return bytes(buf)
                buf += chunk
                if len(buf) > limit:
                    if answer:
                        raise self._too_large()
                    raise UpstreamMalformedResponse(
                        f"provider {self.name!r} answered with more than {limit} bytes",
                        provider=self.name,
                    )

    async def _read_error_body(self, response: _Response) -> bytes:
        """The start of an error body: enough for the provider's message and code."""
        buf = bytearray()
        with aio.move_on_after(min(self.settings.stall_timeout_s, 5.0)):
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) >= MAX_ERROR_BODY_BYTES:
                    break
        return bytes(buf[:MAX_ERROR_BODY_BYTES])

    def _raise_for_status(self, response: _Response, body: bytes) -> None:
        if not 200 <= response.status_code < 300:
            raise map_status(
                self.name, response.status_code, response.headers, body, self._secret()
            )

    def _stalled(self, what: str) -> UpstreamRetryableError:
        bound = self.settings.stall_timeout_s
        return UpstreamRetryableError(
            f"provider {self.name!r} stream stalled: no data for {bound:g}s ({what})",
            provider=self.name,
            data={"stalled": True},
        )

    async def _send_streaming(
        self,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        on_chunk: ChunkCallback | None,
    ) -> dict[str, Any]:
        stall = self.settings.stall_timeout_s
        response: _Response | None = None
        read = _StreamRead()
        plain: dict[str, Any] | None = None
        late = False  # (the head came in the step its deadline passed)
        # One cancel scope bounds the wait for the head and then each read of the stream (its
        # deadline moved by ``_pump``): a trio scope with a deadline costs several microseconds
        # to enter and leave, as much as the SSE decoding of a short answer, and a call made two.
        with aio.cancel_scope(deadline=aio.current_time() + stall) as scope:
            response = await self._open("POST", "chat/completions", headers, content)
            late = scope.cancel_called
            if not late:
                scope.deadline = math.inf  # (the head is here: the reads below bound themselves)
                plain = await self._read_streamed(response, read, on_chunk, scope)
        if late:
            # The head came in the very step its deadline passed: the scope is cancelled (a
            # scope cannot be un-cancelled), and its first read would have raised in it — a
            # stall "after 0 chunks" with the head and body there. The body gets a scope of its
            # own, as before the head and stream shared one (only in this rare case).
            assert response is not None
            with aio.cancel_scope() as scope:
                plain = await self._read_streamed(response, read, on_chunk, scope)
        if plain is not None:
            return plain
        if read.ended is None:  # the scope's deadline passed (it caught its cancellation)
            if response is None:
                raise self._stalled("waiting for the response headers")
            if read.grace_until is None:
                raise self._stalled(f"after {read.asm.chunks} chunks")
            read.ended = "finished"
        assert response is not None  # (the head arrived: only its wait leaves it None)
        asm = read.asm
        completion = asm.completion()
        judge(
            self.name,
            completion,
            errors=asm.errors,
            ended=read.ended,
            # (only an error document uses it: no headers object is built for an answer)
            retry_after_s=parse_retry_after(response.headers) if asm.errors else None,
            secret=self._secret(),
        )
        return completion

    async def _read_streamed(
        self,
        response: _Response,
        read: _StreamRead,
        on_chunk: ChunkCallback | None,
        scope: Any,
    ) -> dict[str, Any] | None:
        """Read a streamed request's response whose head came: an error status raised, a
        response in one piece returned as its completion, a stream read into ``read`` (then
        ``None``), each read bounded by ``scope`` (:meth:`_pump`). The response is closed on
        every path."""
        try:
            if not 200 <= response.status_code < 300:
                self._raise_for_status(response, await self._read_error_body(response))
            if "text/event-stream" not in _content_type(response):
                # A provider may ignore stream=true and answer (or fail) in one piece.
                body = await self._read_body(response, self._answer_body_limit, answer=True)
                return self._plain_completion(response, body)
            await self._read_sse(response, read, on_chunk, scope)
            return None
        finally:
            # On cancellation too: closing an unfinished response closes the connection, so
            # the upstream stops generating at once.
            await response.aclose()

    async def _read_sse(
        self,
        response: _Response,
        read: _StreamRead,
        on_chunk: ChunkCallback | None,
        scope: Any,
    ) -> None:
        """Read the stream into ``read`` (its ``ended`` says how the read stopped), each read
        bounded by ``scope``'s deadline (see :meth:`_pump`)."""
        byte_iter = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
        async with contextlib.aclosing(byte_iter) as chunks:
            read.ended = await self._pump(chunks, read, on_chunk, scope)
            # (the body's end usually came with [DONE]: then nothing is left to wait for)
            if read.ended == "done" and not (isinstance(response, Response) and response.ended):
                await self._drain(chunks)

    async def _drain(self, chunks: AsyncIterator[bytes]) -> None:
        """Read what follows ``[DONE]`` (the end of the chunked body, normally at once) so the
        connection goes back to the pool instead of being closed. Bounded in bytes and time."""
        drained = 0
        with aio.move_on_after(min(self.settings.stall_timeout_s, 1.0)):
            async for extra in chunks:
                drained += len(extra)
                if drained > 64 * 1024:
                    break

    async def _pump(
        self,
        chunks: AsyncIterator[bytes],
        read: _StreamRead,
        on_chunk: ChunkCallback | None,
        scope: Any,
    ) -> Ended:
        """Read events until the stream says it is over; returns how the read stopped.

        ``"done"``: ``[DONE]``; ``"eof"``: the connection closed; ``"error"``: an error
        document arrived (a chunk's ``error``, an ``event: error`` frame: nothing after it can
        make the answer whole); ``"finished"``: every choice had its finish reason and nothing
        more came within :data:`FINISH_GRACE_S` (a provider that never sends ``[DONE]`` and
        holds the connection open). No byte for ``stall_timeout_s`` before that is a stall.

        ``scope`` (the caller's, entered around this read) bounds each read: its deadline is
        moved before each one (a scope per read cost more than the chunk's decoding) and lifted
        while a chunk is handled. When it passes, its cancellation leaves this method and the
        caller tells a stall from the grace's end by ``read.grace_until``.
        """
        stall = self.settings.stall_timeout_s
        asm = read.asm
        decoder = read.decoder
        while True:
            now = aio.current_time()
            deadline = now + stall
            if read.grace_until is None and asm.all_finished:
                # Usage may still follow the finish chunk, then [DONE]; wait a little, once.
                read.grace_until = now + FINISH_GRACE_S
            if read.grace_until is not None:
                deadline = min(deadline, read.grace_until)
                if deadline <= now:
                    return "finished"
            scope.deadline = deadline
            raw = await anext(chunks, b"")
            scope.deadline = math.inf
            if raw == b"":
                return "eof"
            ended = await self._handle_chunk(raw, decoder, asm, on_chunk)
            if ended is not None:
                return ended

    async def _handle_chunk(
        self,
        raw: bytes,
        decoder: SSEDecoder,
        asm: StreamAssembler,
        on_chunk: ChunkCallback | None,
    ) -> Ended | None:
        """Decode one chunk's events into ``asm``; how the stream ended, if it did."""
        try:
            events = decoder.feed(raw)
        except ValueError as exc:
            raise UpstreamMalformedResponse(
                f"provider {self.name!r} sent a malformed stream: {exc}", provider=self.name
            ) from None
        for ev in events:
            if ev.event == "error":
                asm.errors.append(_sse_error(ev.data))
                return "error"
            data = ev.data.strip()
            if data == "[DONE]":
                return "done"
            try:
                text, thought = asm.add(loads(data))
            except ValueError:
                raise UpstreamMalformedResponse(
                    f"provider {self.name!r} sent a stream chunk that is not a "
                    "chat.completion.chunk",
                    provider=self.name,
                ) from None
            if asm.errors:
                return "error"
            if asm.answer_bytes > self.max_answer_bytes:
                raise self._too_large()
            if on_chunk is not None and (text or thought):
                await on_chunk(text, thought)
        return None

    async def list_models(self) -> list[str]:
        """``GET /models``: the model ids the provider reports.

        Raises:
            UpstreamError: as for :meth:`chat`.
        """
        try:
            response = await self._open("GET", "models", self._headers(False))
            try:
                body = await self._read_body(response)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise map_transport_error(self.name, exc) from None
        self._raise_for_status(response, body)
        try:
            data = loads(body)
            items = data["data"] if isinstance(data, dict) else data
            ids = [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]
        except (ValueError, KeyError, TypeError):
            raise UpstreamMalformedResponse(
                f"provider {self.name!r} answered /models with an unexpected shape",
                provider=self.name,
            ) from None
        return ids
