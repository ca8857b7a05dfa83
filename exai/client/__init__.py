"""The editor's side of exai: :class:`Client` (an MCP client for scripts and tools, on trio or
asyncio), the stdio bridge an MCP client launches (:mod:`exai.client.bridge`) and the WebSocket
client both use (:mod:`exai.client.ws`)."""

from exai.client.client import PROTOCOL_VERSION, Client, ProgressCallback, error_from_jsonrpc

__all__ = ["PROTOCOL_VERSION", "Client", "ProgressCallback", "error_from_jsonrpc"]
