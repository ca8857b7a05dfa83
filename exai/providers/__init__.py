"""exai.providers: Kimi, GLM and any OpenAI-compatible endpoint behind one router.

::

    async with ProviderRouter(settings) as router:
        resp = await router.complete(ChatRequest(messages=[{"role": "user", "content": "hi"}]))
        resp.content, resp.model, resp.provider, resp.usage, resp.attempts

Layers, outermost first: :class:`ProviderRouter` (routing, fallback chains, retries inside the
caller's deadline) → :class:`Provider` (Retry-After hold, RPM and TPM buckets, circuit breaker,
concurrency limiter) → :class:`OpenAIClient` (bounded HTTP/1.1 pool, SSE, error mapping).
"""

from exai.providers.client import OpenAIClient
from exai.providers.provider import Provider
from exai.providers.registry import ModelRegistry
from exai.providers.router import ProviderRouter
from exai.providers.types import Attempt, ChatRequest, ChatResponse, StreamDelta, Usage

__all__ = [
    "Attempt",
    "ChatRequest",
    "ChatResponse",
    "ModelRegistry",
    "OpenAIClient",
    "Provider",
    "ProviderRouter",
    "StreamDelta",
    "Usage",
]
