"""The one OpenAI-compatible HTTP client, and the one place where HTTP errors become exai errors.

:class:`OpenAIClient` talks to one provider over its own ``httpx.AsyncClient`` (a bounded pool):
``POST /chat/completions`` (plain or SSE-streamed) and ``GET /models``. It knows nothing about
buckets, breakers or fallbacks; :class:`exai.providers.provider.Provider` puts those around it.

Error mapping (:func:`map_transport_error`, :func:`map_status`)::

    httpx.TimeoutException, ConnectError, RemoteProtocolError, ReadError, WriteError
                                    → UpstreamRetryableError
    401, 403                        → UpstreamAuthError           (never retried)
    429                             → UpstreamRateLimited          (retry_after_s from Retry-After)
    408, 5xx                        → UpstreamRetryableError
    400, 404, 413, 422, other 4xx   → UpstreamBadRequest
    3xx, bad JSON, wrong shape      → UpstreamMalformedResponse
    no bytes for stall_timeout_s    → UpstreamRetryableError("… stalled: no data for Xs")

Keys: the ``Authorization`` header is built per request from ``ProviderSettings.api_key`` (so a
rotated key takes effect on the next request), sent only to this provider's base URL (redirects
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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import anyio
import anyio.to_thread
import httpx

from exai.config import ProviderSettings
from exai.errors import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.providers.sse import SSEDecoder, StreamAssembler

__all__ = [
    "ChunkCallback",
    "OpenAIClient",
    "map_status",
    "map_transport_error",
    "parse_retry_after",
]

#: The largest non-streamed response body accepted (a real completion is far smaller).
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Longest provider error text carried into an exai error message.
MAX_ERROR_TEXT = 300
#: Retry-After values are clamped to this (a provider asking for a day is treated as an hour).
MAX_RETRY_AFTER_S = 3600.0

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


def _clamp(v: float) -> float | None:
    if math.isnan(v):
        return None
    return min(max(v, 0.0), MAX_RETRY_AFTER_S)


def _error_text(body: bytes, secret: str | None) -> str:
    text = ""
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("code") or "")
        elif isinstance(err, str):
            text = err
        elif isinstance(data, dict) and "message" in data:
            text = str(data["message"])
    except (ValueError, UnicodeDecodeError):
        text = body[:MAX_ERROR_TEXT].decode("utf-8", errors="replace")
    return scrub(text[:MAX_ERROR_TEXT].strip(), secret)


def scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` masked (providers sometimes echo keys)."""
    if secret and len(secret) >= 4 and secret in text:
        text = text.replace(secret, "***")
    return text


def map_status(
    provider: str, status: int, headers: httpx.Headers, body: bytes, secret: str | None = None
) -> UpstreamError:
    """The exai error for a non-2xx HTTP answer."""
    detail = _error_text(body, secret)
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        return UpstreamAuthError(
            f"provider {provider!r} refused the API key (HTTP {status}){suffix}; "
            "check the provider's API key",
            provider=provider,
        )
    if status == 429:
        ra = parse_retry_after(headers)
        when = f"; retry after {ra:.3f}s" if ra is not None else ""
        return UpstreamRateLimited(
            f"provider {provider!r} is rate limiting (HTTP 429){when}{suffix}",
            provider=provider,
            retry_after_s=ra,
        )
    if status == 408 or status >= 500:
        return UpstreamRetryableError(
            f"provider {provider!r} is unavailable (HTTP {status}){suffix}",
            provider=provider,
            retry_after_s=parse_retry_after(headers),
            data={"status": status},
        )
    if 400 <= status < 500:
        return UpstreamBadRequest(
            f"provider {provider!r} rejected the request (HTTP {status}){suffix}",
            provider=provider,
            data={"status": status},
        )
    return UpstreamMalformedResponse(
        f"provider {provider!r} answered with unexpected HTTP {status}",
        provider=provider,
        data={"status": status},
    )


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


#: connections per httpx client shard (see :class:`OpenAIClient`)
SHARD_CONNECTIONS = 16


class OpenAIClient:
    """One provider's HTTP side: a bounded ``httpx.AsyncClient`` and the OpenAI wire format.

    Use as an async context manager; the pool is closed on exit.

    Args:
        settings: the provider; read on every request (``base_url`` fixed at open).
        transport: an httpx transport to use instead of the network (unit tests).

    Resource handling:
        At most ``settings.pool_max`` connections, split over ``ceil(pool_max / 16)``
        ``httpx.AsyncClient`` shards of at most 16 connections each; a request goes to the
        shard with the fewest requests in flight. (httpcore scans every pooled connection
        for every queued request, so one pool of thousands of connections costs quadratic
        CPU under load; small shards keep each scan short.) A cancelled call closes its
        response, and with it the connection, before the cancellation propagates: the
        upstream sees the disconnect and stops generating.
    """

    def __init__(
        self, settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._transport = transport
        self._shards: list[httpx.AsyncClient] = []
        self._inflight: list[int] = []

    async def __aenter__(self) -> OpenAIClient:
        s = self.settings
        verify: ssl.SSLContext | bool = False  # plain http: no TLS, no context to build
        if self._transport is None and s.base_url.lower().startswith("https:"):
            verify = await shared_ssl_context()
        pool_max = max(1, s.pool_max)
        shards = 1 if self._transport is not None else -(-pool_max // SHARD_CONNECTIONS)
        # Only the connect phase has an httpx timeout; everything else is bounded by the
        # caller's cancel scope (the call deadline) and by the stream stall bound below.
        timeout = httpx.Timeout(None, connect=s.connect_timeout_s)
        try:
            for i in range(shards):
                size = pool_max // shards + (1 if i < pool_max % shards else 0)
                limits = httpx.Limits(
                    max_connections=size, max_keepalive_connections=size, keepalive_expiry=30
                )
                client = httpx.AsyncClient(
                    base_url=s.base_url.rstrip("/") + "/",
                    limits=limits,
                    timeout=timeout,
                    follow_redirects=False,
                    transport=self._transport,
                    headers={"user-agent": "exai"},
                    trust_env=False,
                    verify=verify,
                )
                await client.__aenter__()
                self._shards.append(client)
                self._inflight.append(0)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        shards, self._shards, self._inflight = self._shards, [], []
        for client in shards:
            with anyio.CancelScope(shield=True):
                await client.__aexit__(None, None, None)

    @contextlib.contextmanager
    def _shard(self) -> Iterator[httpx.AsyncClient]:
        """The least busy shard, counted as busy while the ``with`` block runs."""
        if not self._shards:
            raise RuntimeError(f"client for provider {self.name!r} is not open")
        i = min(range(len(self._inflight)), key=self._inflight.__getitem__)
        self._inflight[i] += 1
        try:
            yield self._shards[i]
        finally:
            if i < len(self._inflight):
                self._inflight[i] -= 1

    # ------------------------------------------------------------------------------------
    def _headers(self, streaming: bool) -> dict[str, str]:
        # Small on purpose: Kimi rejects a request whose headers exceed ~4 KB.
        h = {"accept": "text/event-stream" if streaming else "application/json"}
        key = self.settings.api_key
        if key:
            h["authorization"] = "Bearer " + key.reveal()
        return h

    def _secret(self) -> str | None:
        key = self.settings.api_key
        return key.reveal() if key else None

    async def chat(
        self, body: dict[str, Any], *, on_chunk: ChunkCallback | None = None
    ) -> dict[str, Any]:
        """``POST /chat/completions``; returns a ``chat.completion`` object.

        With ``body["stream"]`` true the answer is read as SSE, ``on_chunk`` is called for
        each chunk with text, and the chunks are assembled into one completion.

        Raises:
            UpstreamError: a subclass per the table in the module docstring.
        """
        streaming = bool(body.get("stream"))
        with self._shard() as http:
            try:
                request = http.build_request(
                    "POST", "chat/completions", json=body, headers=self._headers(streaming)
                )
                if streaming:
                    return await self._send_streaming(http, request, on_chunk)
                return await self._send_plain(http, request)
            except httpx.HTTPError as exc:
                raise map_transport_error(self.name, exc) from None

    async def _send_plain(self, http: httpx.AsyncClient, request: httpx.Request) -> dict[str, Any]:
        response = await http.send(request, stream=True)
        try:
            body = await self._read_body(response)
        finally:
            await response.aclose()
        self._raise_for_status(response, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise UpstreamMalformedResponse(
                f"provider {self.name!r} answered with a body that is not JSON",
                provider=self.name,
            ) from None
        return _validate_completion(self.name, data)

    async def _read_body(self, response: httpx.Response) -> bytes:
        buf = bytearray()
        async for chunk in response.aiter_bytes():
            buf += chunk
            if len(buf) > MAX_BODY_BYTES:
                raise UpstreamMalformedResponse(
                    f"provider {self.name!r} answered with more than {MAX_BODY_BYTES} bytes",
                    provider=self.name,
                )
        return bytes(buf)

    def _raise_for_status(self, response: httpx.Response, body: bytes) -> None:
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
        self, http: httpx.AsyncClient, request: httpx.Request, on_chunk: ChunkCallback | None
    ) -> dict[str, Any]:
        stall = self.settings.stall_timeout_s
        response: httpx.Response | None = None
        with anyio.move_on_after(stall):
            response = await http.send(request, stream=True)
        if response is None:
            raise self._stalled("waiting for the response headers")
        try:
            if not 200 <= response.status_code < 300:
                body = await self._read_body(response)
                self._raise_for_status(response, body)
            ctype = response.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                # A provider may ignore stream=true and answer in one piece.
                body = await self._read_body(response)
                try:
                    return _validate_completion(self.name, json.loads(body))
                except ValueError:
                    raise UpstreamMalformedResponse(
                        f"provider {self.name!r} answered with a body that is neither SSE nor JSON",
                        provider=self.name,
                    ) from None
            return await self._read_sse(response, on_chunk)
        finally:
            # On cancellation too: closing an unfinished response closes the connection, so
            # the upstream stops generating at once.
            await response.aclose()

    async def _read_sse(
        self, response: httpx.Response, on_chunk: ChunkCallback | None
    ) -> dict[str, Any]:
        decoder = SSEDecoder()
        asm = StreamAssembler()
        byte_iter = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
        async with contextlib.aclosing(byte_iter) as chunks:
            done = await self._pump(chunks, decoder, asm, on_chunk)
            if done:
                await self._drain(chunks)
        if not done and asm.finish_reason is None:
            raise UpstreamRetryableError(
                f"provider {self.name!r} stream ended early after {asm.chunks} chunks",
                provider=self.name,
            )
        return asm.completion()

    async def _drain(self, chunks: AsyncIterator[bytes]) -> None:
        """Read what follows ``[DONE]`` (the end of the chunked body, normally at once) so the
        connection goes back to the pool instead of being closed. Bounded in bytes and time."""
        drained = 0
        with anyio.move_on_after(min(self.settings.stall_timeout_s, 1.0)):
            async for extra in chunks:
                drained += len(extra)
                if drained > 64 * 1024:
                    break

    async def _pump(
        self,
        chunks: AsyncIterator[bytes],
        decoder: SSEDecoder,
        asm: StreamAssembler,
        on_chunk: ChunkCallback | None,
    ) -> bool:
        stall = self.settings.stall_timeout_s
        done = False
        while not done:
            raw: bytes | None = None
            with anyio.move_on_after(stall):
                raw = await anext(chunks, b"")
            if raw is None:
                raise self._stalled(f"after {asm.chunks} chunks")
            if raw == b"":
                break
            try:
                events = decoder.feed(raw)
            except ValueError as exc:
                raise UpstreamMalformedResponse(
                    f"provider {self.name!r} sent a malformed stream: {exc}", provider=self.name
                ) from None
            for ev in events:
                data = ev.data.strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                        raise UpstreamRetryableError(
                            f"provider {self.name!r} reported an error mid-stream: "
                            + _error_text(data.encode(), self._secret()),
                            provider=self.name,
                        )
                    text, thought = asm.add(chunk)
                except ValueError:
                    raise UpstreamMalformedResponse(
                        f"provider {self.name!r} sent a stream chunk that is not a "
                        "chat.completion.chunk",
                        provider=self.name,
                    ) from None
                if on_chunk is not None and (text or thought):
                    await on_chunk(text, thought)
        return done

    async def list_models(self) -> list[str]:
        """``GET /models``: the model ids the provider reports.

        Raises:
            UpstreamError: as for :meth:`chat`.
        """
        with self._shard() as http:
            try:
                response = await http.send(
                    http.build_request("GET", "models", headers=self._headers(False)),
                    stream=True,
                )
                try:
                    body = await self._read_body(response)
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise map_transport_error(self.name, exc) from None
        self._raise_for_status(response, body)
        try:
            data = json.loads(body)
            items = data["data"] if isinstance(data, dict) else data
            ids = [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]
        except (ValueError, KeyError, TypeError):
            raise UpstreamMalformedResponse(
                f"provider {self.name!r} answered /models with an unexpected shape",
                provider=self.name,
            ) from None
        return ids
