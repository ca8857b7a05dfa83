"""Reading the files a tool call names: the sandbox, the size caps and the token budget.

::

    sandbox = FileSandbox(settings)
    block = await sandbox.read(["/home/me/proj/app.py"], token_budget=20_000)
    prompt = question + "\\n\\n" + block.text          # block.notes: what was cut or skipped

**Which paths are read.** A path must be absolute and lie under one of the allowed roots
(``EXAI_FILE_ROOTS``; default: the user's home directory). Refused, with
:class:`~exai.errors.FileAccessError` (JSON-RPC -32602, ``data.reason = "file_denied"``,
``data.rule`` saying which rule, ``data.field`` naming the argument when known):

* ``relative`` — not an absolute path (``~`` is not expanded either);
* ``parent_ref`` — any ``..`` component, even one that would stay inside a root;
* ``bad_path`` — a NUL byte or a control character in the path;
* ``outside_roots`` — the path, resolved with every symlink followed, is not under a root
  (the roots are resolved the same way);
* ``symlink_escape`` — the path is under a root as written, but a symlink in it leads out.
  Symlinks that stay inside the allowed roots are followed (``current -> releases/v2``);
* ``denied_name`` — a component of the path as written or as resolved is a credential location:
  :data:`DENIED_NAMES` (``.ssh``, ``.aws``, ``.gnupg``, ``.kube``, ``.netrc``, ``.pypirc``,
  ``.git-credentials``, ``.docker/config.json``, …), ``.env`` and ``.env.*`` except
  ``.env.example``, ``id_rsa*``/``id_ed25519*``/``id_ecdsa*``/``id_dsa*`` and ``*.pem``,
  ``*.key``, ``*.p12``, ``*.pfx``;
* ``missing`` / ``not_a_file`` — nothing there, or a directory, device or FIFO.

:meth:`FileSandbox.read` raises for the policy rules (a refused path is never silently dropped)
and turns ``missing``/``not_a_file`` and unreadable files into notes, so a file deleted between
two workflow steps does not sink the final step.

**How much is read.** Each file at most ``EXAI_FILE_MAX_BYTES`` (``cap + 1`` bytes are read, so
an oversized file is detected without reading it whole), all files of one call together at most
``EXAI_FILES_MAX_TOTAL_BYTES``; then the text is fitted to a token budget (≈ 4 characters per
token, :data:`CHARS_PER_TOKEN`). Every cut leaves a visible notice in the text, e.g.
``[… truncated: file is 900000 bytes, showing the first 262144 …]``. A file with a NUL byte in
its first 8 KiB, or that is not valid UTF-8, is skipped with a note.

Resource handling:
    Every file-system call (``realpath``, ``stat``, ``open``, ``read``) runs in a worker thread
    through ``anyio.to_thread.run_sync`` under :data:`FILE_LIMITER`, so a slow disk or network
    mount never blocks the event loop and never takes more than its share of threads. A file is
    opened with ``O_NOFOLLOW | O_NONBLOCK`` on its resolved path and checked to be the same
    inode that was vetted, so swapping in a symlink or a FIFO after the check is refused.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

from exai.config import Settings
from exai.errors import FileAccessError

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_TOKEN_BUDGET",
    "DENIED_NAMES",
    "DENIED_PATTERNS",
    "FILE_LIMITER",
    "FileSandbox",
    "FilesBlock",
    "context_tokens",
]

#: Characters per token assumed when fitting text to a budget.
CHARS_PER_TOKEN = 4
#: Token budget for files when the caller knows nothing better (``chat``'s hook).
DEFAULT_TOKEN_BUDGET = 48_000
#: Bytes looked at for a NUL byte.
BINARY_SNIFF_BYTES = 8 * 1024
#: Bounds the worker threads file reads may hold at once (all calls together).
FILE_LIMITER = anyio.CapacityLimiter(8)

#: Path components that are never read, anywhere under a root.
DENIED_NAMES: frozenset[str] = frozenset(
    {
        ".ssh",
        ".aws",
        ".gnupg",
        ".kube",
        ".netrc",
        ".pypirc",
        ".git-credentials",
        ".npmrc",
        ".azure",
        ".password-store",
    }
)
#: Glob patterns matched against each component (case-insensitively).
DENIED_PATTERNS: tuple[str, ...] = (
    ".env",
    ".env.*",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
)
#: (directory, file) pairs that are denied together: ``~/.docker/config.json`` holds registry
#: credentials, while a project's ``.docker/`` folder of Dockerfiles is fine.
DENIED_PAIRS: frozenset[tuple[str, str]] = frozenset({(".docker", "config.json")})
#: Names that match a pattern above but are documentation, not secrets.
ALLOWED_NAMES: frozenset[str] = frozenset({".env.example", ".env.sample", ".env.template"})

# Approximate context windows (tokens) of known models, by name prefix; longest prefix wins.
_CONTEXT_TOKENS: tuple[tuple[str, int], ...] = (
    ("kimi-k2", 256_000),
    ("kimi-thinking", 128_000),
    ("moonshot-v1-8k", 8_000),
    ("moonshot-v1-32k", 32_000),
    ("moonshot-v1-128k", 128_000),
    ("glm-4.6", 200_000),
    ("glm-4.5v", 64_000),
    ("glm-4.5", 128_000),
)


def exai_own_paths(settings: Settings, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Files and directories of exai itself that no tool may read: every ``*_FILE`` secret,
    the tokens file, the TLS key, the TOML and ``.env`` files, the audit log and the state
    directory (SQLite store, spool)."""
    paths = [str(settings.state_path)]
    for value in (settings.audit_log, settings.tls_key):
        if value:
            paths.append(value)
    for name, value in environ.items():
        if not value:
            continue
        secret_file = name.endswith("_FILE") and name.startswith(("EXAI_", "KIMI_", "GLM_"))
        if secret_file or name in ("EXAI_CONFIG", "EXAI_ENV_FILE"):
            paths.append(value)
    return tuple(os.path.abspath(p) for p in paths)


def context_tokens(model: str | None, default: int = 128_000) -> int:
    """The approximate context window of ``model`` (``provider/model`` accepted); ``default``
    for ``auto`` and unknown models."""
    name = (model or "").rsplit("/", 1)[-1].lower()
    best = ""
    found = default
    for prefix, tokens in _CONTEXT_TOKENS:
        if name.startswith(prefix) and len(prefix) > len(best):
            best, found = prefix, tokens
    return found


@attrs.frozen(kw_only=True)
class FilesBlock:
    """Files ready to go into a prompt.

    Attributes:
        text: the files, each between ``--- BEGIN FILE`` / ``--- END FILE`` lines with line
            numbers; truncation notices and skip notes are inline, so the model sees them too.
        notes: one line per file that was cut or skipped, for the tool's result.
        files: the paths whose content (whole or part) is in ``text``.
    """

    text: str = ""
    notes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.text


def _denied_component(part: str) -> bool:
    low = part.lower()
    if low in ALLOWED_NAMES:
        return False
    if low in DENIED_NAMES:
        return True
    return any(fnmatch.fnmatchcase(low, pat) for pat in DENIED_PATTERNS)


def _denied(parts: Sequence[str]) -> str | None:
    """The first credential-location component of ``parts`` (or pair, joined), or None."""
    for i, part in enumerate(parts):
        if _denied_component(part):
            return part
        if i and (parts[i - 1].lower(), part.lower()) in DENIED_PAIRS:
            return f"{parts[i - 1]}/{part}"
    return None


def _refuse(path: str, rule: str, message: str, field: str | None) -> FileAccessError:
    data: dict[str, Any] = {"path": path[:512], "rule": rule}
    if field is not None:
        data["field"] = field
    where = f"{field}: " if field else ""
    return FileAccessError(f"{where}{message}", data=data)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@attrs.frozen
class _Vetted:
    given: str
    real: str
    dev: int
    ino: int
    size: int


class FileSandbox:
    """The allowed roots and caps of ``settings``, and the reader that applies them.

    Usable as the daemon's ``services["files"]``: :meth:`embed` is the hook ``chat`` calls.

    Args:
        settings: ``effective_file_roots``, ``file_max_bytes``, ``files_max_total_bytes``.
    """

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None) -> None:
        self.roots: tuple[str, ...] = tuple(settings.effective_file_roots)
        self.max_file_bytes = int(settings.file_max_bytes)
        self.max_total_bytes = int(settings.files_max_total_bytes)
        self._real_roots: tuple[str, ...] | None = None
        self.own_paths = exai_own_paths(settings, os.environ if environ is None else environ)
        self._real_own: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return (
            f"FileSandbox(roots={list(self.roots)!r}, max_file_bytes={self.max_file_bytes}, "
            f"max_total_bytes={self.max_total_bytes})"
        )

    # -- checking ------------------------------------------------------------------------
    def resolve(self, path: str, *, field: str | None = None) -> Path:
        """The resolved path of ``path`` if the sandbox allows reading it.

        Blocking (``realpath``, ``stat``): call it from a worker thread, or use :meth:`check`.

        Raises:
            FileAccessError: the path is refused; ``data.rule`` says why (see the module
                docstring) and the message says what to do.
        """
        return Path(self._vet(path, field).real)

    def _roots(self) -> tuple[str, ...]:
        if self._real_roots is None:
            self._real_roots = tuple(os.path.realpath(r) for r in self.roots)
        return self._real_roots

    def _vet(self, path: str, field: str | None) -> _Vetted:
        if not isinstance(path, str) or not path:
            raise _refuse(str(path), "relative", "a file path must be a non-empty string", field)
        if any(ord(c) < 32 or c == "\x7f" for c in path):
            raise _refuse(path, "bad_path", "the path contains a control character", field)
        if not path.startswith("/"):
            raise _refuse(
                path, "relative", f"{path!r} is not an absolute path; give the full path", field
            )
        parts = [p for p in path.split("/") if p]
        if ".." in parts:
            raise _refuse(
                path,
                "parent_ref",
                f"{path!r} contains '..'; give the path without parent references",
                field,
            )
        roots = self._roots()
        lexical = os.path.normpath(path)
        real = os.path.realpath(lexical)
        for component in (_denied(parts), _denied([c for c in real.split("/") if c])):
            if component is not None:
                raise _refuse(
                    path,
                    "denied_name",
                    f"{path!r} is a credential location ({component!r}); exai never reads "
                    "those (see docs/tools.md)",
                    field,
                )
        if self._real_own is None:
            self._real_own = tuple(os.path.realpath(p) for p in self.own_paths)
        if any(_under(real, own) for own in self._real_own):
            raise _refuse(
                path,
                "exai_secret",
                f"{path!r} is one of exai's own files (secrets, state, audit log or "
                "configuration); tools never read those",
                field,
            )
        if not any(_under(real, r) for r in roots):
            given_roots = (*self.roots, *roots)
            if any(_under(lexical, r) for r in given_roots):
                raise _refuse(
                    path,
                    "symlink_escape",
                    f"{path!r} is a symlink (or under one) that leads outside the allowed "
                    f"roots, to {real!r}; only symlinks that stay inside the roots are followed",
                    field,
                )
            raise _refuse(
                path,
                "outside_roots",
                f"{path!r} is outside the allowed roots ({', '.join(self.roots)}); "
                "set EXAI_FILE_ROOTS to allow another directory",
                field,
            )
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise _refuse(path, "missing", f"{path!r} does not exist", field) from None
        except OSError as exc:
            raise _refuse(
                path, "missing", f"{path!r} cannot be read ({exc.strerror})", field
            ) from None
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _refuse(
                path, "not_a_file", f"{path!r} is {what}; name the files themselves", field
            )
        return _Vetted(path, real, st.st_dev, st.st_ino, st.st_size)

    async def check(self, paths: Sequence[str], *, field: str = "arguments.files") -> list[Path]:
        """:meth:`resolve` every path in a worker thread; the resolved paths.

        Raises:
            FileAccessError: the first refused path, with ``data.field`` = ``field[i]``.
        """
        if not paths:
            return []

        def run() -> list[Path]:
            return [self.resolve(p, field=f"{field}[{i}]") for i, p in enumerate(paths)]

        return await anyio.to_thread.run_sync(run, limiter=FILE_LIMITER)

    # -- reading -------------------------------------------------------------------------
    async def read(
        self, paths: Sequence[str], *, token_budget: int, field: str = "arguments.files"
    ) -> FilesBlock:
        """Read ``paths`` (duplicates once, in order) into a :class:`FilesBlock`.

        Args:
            paths: absolute paths.
            token_budget: tokens the text may take (≈ :data:`CHARS_PER_TOKEN` chars each).
            field: how the paths are named in errors (``arguments.relevant_files``).

        Raises:
            FileAccessError: a path breaks a sandbox rule (nothing is read then).
        """
        unique = list(dict.fromkeys(paths))
        if not unique:
            return FilesBlock()

        def vet_all() -> list[_Vetted | FileAccessError]:
            out: list[_Vetted | FileAccessError] = []
            for p in unique:
                i = list(paths).index(p)
                try:
                    out.append(self._vet(p, f"{field}[{i}]"))
                except FileAccessError as exc:
                    if exc.extra.get("rule") not in ("missing", "not_a_file"):
                        raise
                    out.append(exc)
            return out

        vetted = await anyio.to_thread.run_sync(vet_all, limiter=FILE_LIMITER)
        chars_left = max(0, token_budget) * CHARS_PER_TOKEN
        bytes_left = self.max_total_bytes
        pieces: list[str] = []
        notes: list[str] = []
        included: list[str] = []
        for item in vetted:
            if isinstance(item, FileAccessError):
                note = f"skipped {item.extra['path']}: {_message(item)}"
                notes.append(note)
                pieces.append(f"[{note}]")
                continue
            if bytes_left <= 0:
                note = (
                    f"skipped {item.given}: the call's total of {self.max_total_bytes} bytes "
                    "of files is used up"
                )
                notes.append(note)
                pieces.append(f"[{note}]")
                continue
            if chars_left <= 0:
                note = f"skipped {item.given}: the token budget for files is used up"
                notes.append(note)
                pieces.append(f"[{note}]")
                continue
            cap = min(self.max_file_bytes, bytes_left)
            rendered, used, read_note = await anyio.to_thread.run_sync(
                _read_one, item, cap, chars_left, limiter=FILE_LIMITER
            )
            if read_note:
                notes.append(read_note)
            if rendered is None:
                pieces.append(f"[{read_note}]")
                continue
            pieces.append(rendered)
            included.append(item.given)
            bytes_left -= used
            chars_left -= len(rendered)
        return FilesBlock(text="\n\n".join(pieces), notes=tuple(notes), files=tuple(included))

    async def embed(self, paths: Sequence[str], ctx: Any) -> str:
        """``chat``'s hook: the files' text (notes inline) within :data:`DEFAULT_TOKEN_BUDGET`.

        Raises:
            FileAccessError: a path breaks a sandbox rule.
        """
        block = await self.read(list(paths), token_budget=DEFAULT_TOKEN_BUDGET)
        return block.text

    def status(self) -> dict[str, Any]:
        """Roots and caps, for ``status``."""
        return {
            "roots": list(self.roots),
            "max_file_bytes": self.max_file_bytes,
            "max_total_bytes": self.max_total_bytes,
        }


def _message(exc: FileAccessError) -> str:
    text = str(exc)
    field = exc.extra.get("field")
    prefix = f"{field}: " if field else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _read_one(item: _Vetted, cap: int, chars_left: int) -> tuple[str | None, int, str | None]:
    """Read and render one vetted file (in a worker thread).

    Returns ``(text or None when skipped, bytes counted against the call, note or None)``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(item.real, flags)
    except OSError as exc:
        return None, 0, f"skipped {item.given}: cannot open it ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (item.dev, item.ino) or not stat.S_ISREG(st.st_mode):
            raise FileAccessError(
                f"{item.given!r} changed while it was being checked; refusing to read it",
                data={"path": item.given[:512], "rule": "changed"},
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    except OSError as exc:
        return None, 0, f"skipped {item.given}: cannot read it ({exc.strerror})"
    finally:
        os.close(fd)
    size = st.st_size
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return None, 0, f"skipped {item.given}: binary file ({size} bytes, NUL byte found)"
    truncated = len(data) > cap
    data = data[:cap]
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        # a cut may split a multi-byte character: keep the complete ones
        text = decoder.decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None, 0, f"skipped {item.given}: not UTF-8 text ({size} bytes)"
    notes: list[str] = []
    if truncated:
        notes.append(
            f"truncated: file is {size} bytes, showing the first {len(data)} "
            "(EXAI_FILE_MAX_BYTES / EXAI_FILES_MAX_TOTAL_BYTES)"
        )
    lines = text.splitlines()
    header = f"--- BEGIN FILE: {item.given} ({len(lines)} lines) ---"
    footer = f"--- END FILE: {item.given} ---"
    body, shown = _numbered(lines, chars_left - len(header) - len(footer) - 200)
    if shown < len(lines):
        notes.append(
            f"truncated to fit the model's token budget: showing lines 1–{shown} of {len(lines)}"
        )
    parts = [header, *([body] if body else []), *(f"[… {n} …]" for n in notes), footer]
    note = f"{item.given}: " + "; ".join(notes) if notes else None
    return "\n".join(parts), len(data), note


def _numbered(lines: Iterable[str], budget: int) -> tuple[str, int]:
    out: list[str] = []
    used = 0
    for n, line in enumerate(lines, 1):
        row = f"{n:>5}│ {line}"
        if used + len(row) + 1 > budget:
            break
        out.append(row)
        used += len(row) + 1
    return "\n".join(out), len(out)
