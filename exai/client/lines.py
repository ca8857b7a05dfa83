"""The bridge's lines: how a message from the MCP client is read and kept on its way to the
daemon, and how a message from the daemon becomes one line for the client.

Lines are parsed as strictly as the daemon parses frames (:data:`DECODER`: no ``NaN``), and every
message is encoded once, by the daemon's own encoder (:func:`dumps_line`), which cannot fail on
decoded JSON. Pure: no I/O.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from exai.logs import log_event
from exai.server.idscan import ID_SCAN_BYTES, recover_id_from_ends
from exai.server.protocol import encode as encode_message

__all__ = ["DECODER", "Entry", "Oversized", "dumps_line", "to_client_line"]


def dumps_line(message: Any) -> str:
    """One message as one line of JSON, always encodable as UTF-8.

    The daemon's own encoder (:func:`exai.server.protocol.encode`): ``json.dumps`` escapes
    control characters, so the text is exactly one line; non-ASCII is written as is, and a
    string holding a lone surrogate (``"\\ud800"``, which JSON allows and the TypeScript SDK
    sends for a split emoji) falls back to ``\\u`` escapes instead of failing to encode.

    Raises:
        ValueError: ``message`` holds NaN or an infinity (JSON cannot carry them).
    """
    return encode_message(message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: The client's lines are read as strictly as the daemon reads frames: no NaN/Infinity.
DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class Entry:
    """A message from the client on its way to the daemon, encoded once when it arrives."""

    __slots__ = ("ever_sent", "key", "msg", "sent", "seq", "size", "text")

    def __init__(self, seq: int, msg: dict[str, Any], key: str | None, text: str) -> None:
        self.seq = seq
        self.msg = msg
        self.text = text  # what is sent, every time it is sent
        self.size = len(text.encode("utf-8"))
        self.key = key  # set for requests (they wait for an answer)
        self.sent = False  # written to the current connection
        self.ever_sent = False  # written to any connection


class Oversized:
    """A line from the client over the size cap, being dropped as it arrives: only its first
    and last :data:`~exai.server.idscan.ID_SCAN_BYTES` are kept, to find its id."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.tail = b""
        self.answered = False
        self.rid = recover_id_from_ends(head, b"")

    def keep_tail(self, data: bytes | bytearray) -> None:
        self.tail = (self.tail + bytes(data[-ID_SCAN_BYTES:]))[-ID_SCAN_BYTES:]

    def find_id(self) -> Any:
        return self.rid if self.rid is not None else recover_id_from_ends(self.head, self.tail)


def to_client_line(msg: dict[str, Any]) -> str:
    """``msg`` as one line for the client. A message that cannot be encoded (a daemon, or
    something posing as one, sent NaN or absurd nesting) never ends the bridge: an answer is
    replaced by an error carrying its id, anything else by a log line and nothing."""
    try:
        return dumps_line(msg)
    except (ValueError, TypeError, RecursionError):
        rid = msg.get("id")
        if "method" in msg or not isinstance(rid, str | int) or isinstance(rid, bool):
            log_event(
                "bridge.daemon_message_unencodable",
                logging.WARNING,
                message="dropped a message from the daemon that cannot be encoded",
            )
            return ""
        log_event(
            "bridge.answer_unencodable",
            logging.WARNING,
            message=f"the daemon's answer to {rid!r} cannot be encoded; answering with an error",
        )
        return dumps_line(
            {
                "jsonrpc": "2.0",
                "id": rid,
                "error": {
                    "code": -32603,
                    "message": "the exai daemon's answer holds a value JSON cannot carry",
                    "data": {"reason": "internal_error"},
                },
            }
        )
