"""The public API of `import exai` is pinned: a change here is a change users see."""

from __future__ import annotations

import exai

PUBLIC = [
    "CircuitBreaker",
    "Client",
    "RedisTokenBucket",
    "Secret",
    "Settings",
    "TokenBucket",
    "__version__",
    "errors",
    "retrying",
    "serve",
]


def test_public_names_are_pinned():
    assert sorted(exai.__all__) == sorted(PUBLIC)


def test_every_public_name_resolves():
    for name in PUBLIC:
        assert getattr(exai, name) is not None


def test_resilience_imports_without_the_daemon():
    import subprocess
    import sys

    code = (
        "import sys, exai.resilience as r; "
        "assert r.CircuitBreaker and r.TokenBucket and r.retrying; "
        "daemon = ('exai.server.app', 'trio', 'trio_websocket', 'asyncpg', 'httpx', 'redis'); "
        "bad = [m for m in (*daemon, 'dotenv') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
