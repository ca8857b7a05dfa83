"""The mock upstream's command-line options, defined once for ``exai mock-upstream`` (the CLI's
parser tree) and ``python -m exai.testing.mock_upstream``; importing this module does not load
the mock itself."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock upstream's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: a free one)")
    parser.add_argument("--latency-s", type=float, default=0.0, help="wait before each answer")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0, help="wait per SSE event")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument(
        "--models", default="mock-fast,mock-pro", help="comma-separated model ids to serve"
    )
    parser.add_argument("--any-model", action="store_true", help="accept models not in --models")
