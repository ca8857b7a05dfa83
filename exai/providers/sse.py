"""Server-sent events, sans-IO: bytes in, events out; and the assembly of a streamed completion.

:class:`SSEDecoder` splits a byte stream into events the way the WHATWG spec says (``data:``
lines joined by newlines, an empty line ends an event, ``:`` lines are comments). It does no
I/O, so the client feeds it whatever chunks the socket gave and the tests feed it anything.

:class:`StreamAssembler` folds OpenAI ``chat.completion.chunk`` objects into the one message a
non-streamed call would have returned: content, reasoning content (thinking models), tool calls
(assembled from their indexed fragments), finish reason, usage — and keeps what
:func:`exai.providers.ending.judge` needs to decide how the stream ended: the finish reason of
each choice, the error documents carried by chunks, and the answer's size in bytes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from exai.providers.ending import ErrorDoc, read_error_doc

__all__ = ["SSEDecoder", "SSEEvent", "StreamAssembler"]

#: An SSE line longer than this without a newline is not a real provider talking.
MAX_LINE_BYTES = 4 * 1024 * 1024


class SSEEvent(NamedTuple):
    """One server-sent event (a named tuple: made for every event of every streamed answer,
    it costs a third of a frozen attrs class)."""

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental SSE decoder.

    ``feed(chunk)`` returns the events completed by ``chunk``; bytes of an unfinished line are
    kept for the next call. ``ValueError`` when a line grows beyond :data:`MAX_LINE_BYTES`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        # the last chunk ended in \r: a \n opening the next one belongs to that line end
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._after_cr or b"\r" in chunk or self._data or self._event:
            return self._feed_lines(chunk)
        if self._buf and b"\n" not in chunk:
            # an unfinished line only grows: append in place (copying and re-scanning all that
            # is buffered on every read made a 4 MiB line in 1 KiB reads cost 20 s of CPU)
            self._buf += chunk
            if len(self._buf) > MAX_LINE_BYTES:
                raise ValueError("SSE line too long")
            return []
        # The fast path (every provider's shape): at an event boundary, lines ended by \n, an
        # event of one ``data: `` line is taken whole; anything else goes line by line.
        buf = bytes(self._buf) + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        pos = 0
        while True:
            end = buf.find(b"\n\n", pos)
            if end < 0 or not buf.startswith(b"data: ", pos) or buf.find(b"\n", pos, end) >= 0:
                break
            data = buf[pos + 6 : end].decode("utf-8", "replace")
            events.append(SSEEvent(data, "message", self._id))
            pos = end + 2
        if pos == len(buf):
            self._buf = bytearray()
            return events
        self._buf = bytearray()
        return events + self._feed_lines(buf[pos:]) if events else self._feed_lines(buf)

    def _feed_lines(self, chunk: bytes) -> list[SSEEvent]:
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = False
        self._buf += chunk
        events: list[SSEEvent] = []
        while True:
            # A line ends with \n, \r\n or \r; providers use \n, so look for it first.
            nl = self._buf.find(b"\n")
            cr = self._buf.find(b"\r")
            if nl < 0 and cr < 0:
                if len(self._buf) > MAX_LINE_BYTES:
                    raise ValueError("SSE line too long")
                return events
            if cr >= 0 and (nl < 0 or cr < nl):
                if cr == len(self._buf) - 1:
                    # A \r that ends the chunk ends the line now (the event it completes must
                    # not wait for the next byte); a \n that follows is skipped.
                    self._after_cr = True
                    end, skip = cr, 1
                else:
                    end, skip = cr, 2 if self._buf[cr + 1 : cr + 2] == b"\n" else 1
            else:
                end, skip = nl, 1
            line = self._buf[:end].decode("utf-8", errors="replace")
            del self._buf[: end + skip]
            ev = self._line(line)
            if ev is not None:
                events.append(ev)

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id)
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:  # the spec ignores an id holding NUL
            self._id = value
        return None


def _utf8_len(text: str) -> int:
    # ASCII (most of any answer) needs no encoding to be measured
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


#: Tool calls one answer may carry (the index is the provider's: bound the list it grows).
MAX_TOOL_CALLS = 128


def _merge_tool_call(calls: list[dict[str, Any]], frag: dict[str, Any]) -> None:
    idx = frag.get("index")
    if not isinstance(idx, int) or isinstance(idx, bool):
        idx = len(calls)
    if not 0 <= idx < MAX_TOOL_CALLS:
        raise ValueError(f"tool call index {idx} outside 0..{MAX_TOOL_CALLS - 1}")
    while len(calls) <= idx:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[idx]
    if frag.get("id"):
        call["id"] = frag["id"]
    if frag.get("type"):
        call["type"] = frag["type"]
    fn = frag.get("function") or {}
    if fn.get("name"):
        call["function"]["name"] = fn["name"]
    if isinstance(fn.get("arguments"), str):
        call["function"]["arguments"] += fn["arguments"]


class StreamAssembler:
    """Folds ``chat.completion.chunk`` objects into one ``chat.completion``-shaped message."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.chunks = 0
        #: finish reason per choice index, and every choice index seen
        self.finished: dict[int, str] = {}
        self.choices: set[int] = set()
        #: error documents carried by chunks (a top-level ``error``), in order
        self.errors: list[ErrorDoc] = []
        #: UTF-8 bytes of content, reasoning and tool-call arguments received
        self.answer_bytes = 0

    @property
    def all_finished(self) -> bool:
        """Every choice seen has a finish reason (and at least one choice was seen)."""
        return bool(self.choices) and self.choices <= self.finished.keys()

    def add(self, chunk: dict[str, Any]) -> tuple[str, str]:
        """Add one chunk; returns the (content, reasoning) text it carried.

        Raises:
            ValueError: the chunk is not the shape the API promises.
        """
        if not isinstance(chunk, dict):
            raise ValueError("chunk is not an object")
        self.chunks += 1
        # (each key looked up once: a streamed answer is a dozen chunks or more, each through
        # here, and a lookup repeated for its check and its use doubled its cost)
        get = chunk.get
        model = get("model")
        if isinstance(model, str):
            self.model = model
        usage = get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        error = get("error")
        if error is not None:
            doc = read_error_doc(error)
            if doc is not None:
                self.errors.append(doc)
        choices = get("choices")
        if choices is None:
            return "", ""
        if not isinstance(choices, list):
            raise ValueError("choices is not a list")
        text = thought = ""
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise ValueError("choice is not an object")
            cget = choice.get
            index = cget("index")
            if type(index) is not int and (not isinstance(index, int) or isinstance(index, bool)):
                index = position
            self.choices.add(index)
            # some providers report usage inside the final choice
            usage = cget("usage")
            if isinstance(usage, dict):
                self.usage = usage
            delta = cget("delta") or {}
            if not isinstance(delta, dict):
                raise ValueError("delta is not an object")
            if delta:
                content = delta.get("content")
                if isinstance(content, str):
                    text += content
                reasoning = delta.get("reasoning_content")
                if isinstance(reasoning, str):
                    thought += reasoning
                for frag in delta.get("tool_calls") or ():
                    if isinstance(frag, dict):
                        _merge_tool_call(self.tool_calls, frag)
                        args = (frag.get("function") or {}).get("arguments")
                        if isinstance(args, str):
                            self.answer_bytes += _utf8_len(args)
            finish = cget("finish_reason")
            if finish:
                self.finish_reason = str(finish)
                self.finished[index] = self.finish_reason
        if text:
            self.answer_bytes += _utf8_len(text)
            self.content.append(text)
        if thought:
            self.answer_bytes += _utf8_len(thought)
            self.reasoning.append(thought)
        return text, thought

    def message(self) -> dict[str, Any]:
        """The assembled assistant message, as a non-streamed response would carry it."""
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def completion(self) -> dict[str, Any]:
        """The whole stream as one ``chat.completion`` object."""
        out: dict[str, Any] = {
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {"index": 0, "message": self.message(), "finish_reason": self.finish_reason}
            ],
        }
        if self.usage is not None:
            out["usage"] = self.usage
        return out
