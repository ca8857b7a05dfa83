"""A test tool loaded into a daemon subprocess (``--plugin tests.security.env_tools:register``)
to observe its process environment from outside without moving a secret over the wire.

``hygiene_environ`` answers with:
- ``value_digests``: the first 16 hex digits of the SHA-256 of every value in ``os.environ``
  (the test compares them with the digests of the secrets it put in ``*_FILE`` files);
- ``child_env``: the environment a child process started with :func:`exai.config.hygiene.child_env`
  actually sees (it must hold no secret at all, so it may be shown in full).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import anyio

from exai.config.hygiene import child_env
from exai.tools.base import ToolContext, ToolRegistry, ToolResult, ToolSpec


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


async def _environ(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    probe = "import json, os; print(json.dumps(dict(os.environ)))"
    done = await anyio.run_process(
        [sys.executable, "-c", probe], env=child_env(settings=ctx.settings)
    )
    return ToolResult.json(
        {
            "value_digests": sorted({digest(v) for v in os.environ.values()}),
            "child_env": json.loads(done.stdout),
        }
    )


ENVIRON = ToolSpec(
    name="hygiene_environ",
    description="Test tool: digests of the daemon's environment values and a child's environment.",
    input_schema={"type": "object", "properties": {}, "additionalProperties": False},
    handler=_environ,
    timeout_s=30.0,
)


def register(registry: ToolRegistry, settings: object = None) -> None:
    if ENVIRON.name not in registry:
        registry.register(ENVIRON)
