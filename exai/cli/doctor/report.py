"""The doctor's findings and how they are shown: :class:`Finding`, :func:`scrub` (no secret in
any text), :func:`render` (one line per finding, each problem followed by its fix) and
:func:`exit_status`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

__all__ = ["Finding", "Level", "error", "exit_status", "ok", "render", "scrub", "warn"]

Level = Literal["ok", "warn", "error"]


@attrs.frozen(kw_only=True)
class Finding:
    """One result of a check.

    Attributes:
        level: ``"ok"``, ``"warn"`` or ``"error"``.
        check: which check (``git``, ``secret-files``, ``tokens``, ``bind``, ``storage``,
            ``redis``, ``provider:<name>``, ``daemon``, ``config``).
        message: what was found, for a person. Never contains a secret.
        fix: what to do about it (empty for ``ok``).
    """

    level: Level
    check: str
    message: str
    fix: str = ""


def ok(check: str, message: str) -> Finding:
    return Finding(level="ok", check=check, message=message)


def warn(check: str, message: str, fix: str) -> Finding:
    return Finding(level="warn", check=check, message=message, fix=fix)


def error(check: str, message: str, fix: str) -> Finding:
    return Finding(level="error", check=check, message=message, fix=fix)


def scrub(findings: list[Finding], secrets: Sequence[str]) -> list[Finding]:
    """The findings with every occurrence of a secret value replaced by ``***``."""

    def clean(text: str) -> str:
        for s in secrets:
            if len(s) >= 4:
                text = text.replace(s, "***")
        return text

    return [attrs.evolve(f, message=clean(f.message), fix=clean(f.fix)) for f in findings]


_MARK = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}


def render(findings: Sequence[Finding]) -> str:
    """The readable report: one line per finding, each problem followed by its fix."""
    lines = ["exai doctor"]
    for f in findings:
        lines.append(f"  {_MARK[f.level]} {f.check}: {f.message}")
        if f.level != "ok" and f.fix:
            lines.append(f"         fix: {f.fix}")
    errors = sum(1 for f in findings if f.level == "error")
    warns = sum(1 for f in findings if f.level == "warn")
    if errors or warns:
        lines.append(f"{errors} error(s), {warns} warning(s)")
    else:
        lines.append("everything checked is fine")
    return "\n".join(lines)


def exit_status(findings: Sequence[Finding], *, strict: bool = False) -> int:
    """1 when any finding is an error (or a warning with ``strict``), else 0."""
    bad = {"error", "warn"} if strict else {"error"}
    return 1 if any(f.level in bad for f in findings) else 0
