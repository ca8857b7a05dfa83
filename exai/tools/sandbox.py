"""Reading the files a tool call names: the sandbox, the size caps and the token budget.

::

    sandbox = FileSandbox(settings)
    block = await sandbox.read(["/home/me/proj/app.py"], token_budget=20_000)
    prompt = question + "\\n\\n" + block.text          # block.notes: what was cut or skipped

**How many paths.** At most :data:`MAX_PATHS` per list argument (``files``,
``relevant_files``): the tool schemas say so with ``maxItems`` and :meth:`FileSandbox.read`
refuses a longer list with :class:`~exai.errors.InvalidParams` (-32602, ``data.field`` naming
the argument, ``data.max_items`` the cap) before any file-system call. A path longer than
:data:`MAX_PATH_BYTES` is refused (``bad_path``) before any system call too.

**Which paths are read.** A path must be absolute and lie under one of the allowed roots
(``EXAI_FILE_ROOTS``; default: the user's home directory without its hidden top-level entries).
Refused, with :class:`~exai.errors.FileAccessError` (JSON-RPC -32602,
``data.reason = "file_denied"``, ``data.rule`` saying which rule, ``data.field`` naming the
argument when known):

* ``relative`` — not an absolute path (``~`` is not expanded either);
* ``parent_ref`` — any ``..`` component, even one that would stay inside a root;
* ``bad_path`` — a NUL byte or a control character in the path, a path longer than
  :data:`MAX_PATH_BYTES` or with more than :data:`MAX_PATH_COMPONENTS` components;
* ``outside_roots`` — the path, resolved with every symlink followed, is not under a root
  (the roots are resolved the same way);
* ``symlink_escape`` — the path is under a root as written, but a symlink in it leads out.
  Symlinks that stay inside the allowed roots are followed (``current -> releases/v2``);
* ``system_path`` — the resolved path is under ``/proc``, ``/sys`` or ``/dev``
  (:data:`PSEUDO_FILE_SYSTEMS`), whatever the roots: ``/proc/self/environ`` is the daemon's
  environment, keys included;
* ``home_hidden`` — with the default roots only: the resolved path is under a hidden entry of
  the home directory (``~/.config``, ``~/.local``, ``~/.bash_history``, …), where applications
  keep their credentials and state. Name such a directory in ``EXAI_FILE_ROOTS`` to allow it;
* ``denied_name`` — a component of the path as written or as resolved is a credential location:
  :data:`DENIED_NAMES` (``.ssh``, ``.aws``, ``.gnupg``, ``.kube``, ``.netrc``, ``.pypirc``,
  ``.git-credentials``, ``.docker/config.json``, …), ``.env`` and ``.env.*`` except
  ``.env.example``, ``id_rsa*``/``id_ed25519*``/``id_ecdsa*``/``id_dsa*`` and ``*.pem``,
  ``*.key``, ``*.p12``, ``*.pfx``;
* ``exai_secret`` — the file **is** one of exai's own files, recognised by identity (device and
  inode), not by name, so a hard link, a symlink or a copy of the path under another name is
  refused all the same: every file the effective settings were read from (the TOML and ``.env``
  files and each ``*_FILE`` secret, whichever source named it: environment, ``.env`` or TOML),
  the TLS key, the audit log and its rotations, the SQLite file and the state directory, and
  the files of the credential locations in the home directory (:data:`CREDENTIAL_PATHS`). The
  identities are taken afresh for every call, and checked again with ``fstat`` on the opened
  descriptor, so no file can be swapped in between the check and the read;
* ``missing`` / ``not_a_file`` — nothing there, or a directory, device or FIFO.

:meth:`FileSandbox.read` raises for the policy rules (a refused path is never silently dropped)
and turns ``missing``/``not_a_file`` and unreadable files into notes, so a file deleted between
two workflow steps does not sink the final step.

**How much is read.** Each file at most ``EXAI_FILE_MAX_BYTES`` (``cap + 1`` bytes are read, so
an oversized file is detected without reading it whole), all files of one call together at most
``EXAI_FILES_MAX_TOTAL_BYTES``; then the text is fitted to a token budget (≈ 3 characters per
token, :data:`CHARS_PER_TOKEN`, the one estimate of :mod:`exai.providers.tokens`). Every cut
leaves a visible notice in the text, e.g.
``[… truncated: file is 900000 bytes, showing the first 262144 …]``. A file with a NUL byte in
its first 8 KiB, or that is not valid UTF-8, is skipped with a note.

Resource handling:
    Every file-system call (``realpath``, ``stat``, ``open``, ``read``) runs in a worker thread
    through ``anyio.to_thread.run_sync`` under :data:`FILE_LIMITER`, so a slow disk or network
    mount never blocks the event loop and never takes more than its share of threads. The
    vetting of a call's paths is linear in their number and length, checks for cancellation
    between two paths, and is abandoned when the call's deadline passes or the daemon stops (a
    thread stuck in a system call keeps its limiter token until it returns, so stuck threads
    stay bounded too). A file is opened with ``O_NOFOLLOW | O_NONBLOCK`` on its resolved path
    and checked to be the same inode that was vetted, so swapping in a symlink or a FIFO after
    the check is refused.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import attrs

from exai.config import Settings
from exai.errors import FileAccessError, InvalidParams
from exai.providers import tokens
from exai.providers.tokens import CHARS_PER_TOKEN

__all__ = [
    "CHARS_PER_TOKEN",
    "CREDENTIAL_PATHS",
    "DEFAULT_TOKEN_BUDGET",
    "DENIED_NAMES",
    "DENIED_PATTERNS",
    "FILE_LIMITER",
    "MAX_PATHS",
    "MAX_PATH_BYTES",
    "MAX_PATH_COMPONENTS",
    "PSEUDO_FILE_SYSTEMS",
    "FileSandbox",
    "FilesBlock",
    "OwnFiles",
    "context_tokens",
    "exai_own_files",
]

#: Characters per token assumed when fitting text to a budget.
#: Token budget for files when the caller knows nothing better (``chat``'s hook).
DEFAULT_TOKEN_BUDGET = 48_000
#: Bytes looked at for a NUL byte.
BINARY_SNIFF_BYTES = 8 * 1024
#: Bounds the worker threads file reads may hold at once (all calls together).
FILE_LIMITER = anyio.CapacityLimiter(8)
#: Most paths one list argument may name; more is -32602 before any file-system call.
MAX_PATHS = 100
#: Longest path accepted, in bytes (Linux ``PATH_MAX``); longer is ``bad_path`` at once.
MAX_PATH_BYTES = 4096
#: Most components a path may have: resolving one costs a system call and some Python per
#: component, so this (not the length) bounds the work of vetting a path. Real projects stay
#: far below it; ``/a/b/c/…`` with 2,000 parts is an attack.
MAX_PATH_COMPONENTS = 128
#: Kernel pseudo file systems, never read whatever the roots (``/proc/self/environ`` holds the
#: daemon's environment, keys included).
PSEUDO_FILE_SYSTEMS: tuple[str, ...] = ("/proc", "/sys", "/dev")
#: Entries looked at per directory of exai's own (state directory, credential directories)
#: when taking the identities of the files inside: the scan is bounded whatever is there.
OWN_DIR_SCAN_ENTRIES = 512

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
#: Credential locations under the home directory whose files are refused by identity too
#: (a hard link to ``~/.ssh/id_ed25519`` named ``notes.txt`` is still the key).
CREDENTIAL_PATHS: tuple[str, ...] = (
    *sorted(DENIED_NAMES),
    ".docker/config.json",
    ".config/gh",
    ".config/gcloud",
    ".config/exai",
)
# one regular expression for every pattern: a component is matched once, at C speed
_DENIED_RE = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in DENIED_PATTERNS))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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


@attrs.frozen(kw_only=True)
class OwnFiles:
    """Where exai's own files are, by path; :meth:`identities` turns them into inodes.

    Attributes:
        files: files refused by path and by identity.
        prefixes: files refused with every sibling that starts with their name (the audit log
            and its rotations ``audit.log.1``; the SQLite file and its ``-wal``/``-shm``).
        dirs: directories refused with everything under them (the state directory).
        scan_dirs: directories whose files are refused by identity only (the credential
            locations; by path they are already ``denied_name``).
    """

    files: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    scan_dirs: tuple[str, ...] = ()

    def owns_path(self, real: str) -> bool:
        """Whether the resolved path ``real`` is one of these files by name."""
        if real in self.files or any(_under(real, d) for d in self.dirs):
            return True
        return any(
            os.path.dirname(real) == os.path.dirname(p)
            and os.path.basename(real).startswith(os.path.basename(p))
            for p in self.prefixes
        )

    def resolved(self) -> OwnFiles:
        """The same files with every symlink in their paths resolved. Blocking."""

        def real(paths: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(dict.fromkeys(os.path.realpath(p) for p in paths))

        return OwnFiles(
            files=real(self.files),
            prefixes=real(self.prefixes),
            dirs=real(self.dirs),
            scan_dirs=real(self.scan_dirs),
        )

    def identities(self) -> frozenset[tuple[int, int]]:
        """``(st_dev, st_ino)`` of every file of these, now. Blocking; bounded by
        :data:`OWN_DIR_SCAN_ENTRIES` per directory."""
        ids: set[tuple[int, int]] = set()
        for path in self.files:
            _add_identity(ids, path)
        for path in self.prefixes:
            parent, name = os.path.split(path)
            _scan(ids, parent, lambda entry, name=name: entry.name.startswith(name), depth=1)
        for path in (*self.dirs, *self.scan_dirs):
            if os.path.isdir(path):
                _scan(ids, path, lambda entry: True, depth=3)
            else:
                _add_identity(ids, path)
        return frozenset(ids)


def _add_identity(ids: set[tuple[int, int]], path: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        ids.add((st.st_dev, st.st_ino))


def _scan(ids: set[tuple[int, int]], top: str, want: Any, *, depth: int) -> None:
    """Identities of the regular files under ``top`` (``depth`` levels, bounded entries)."""
    stack = [(top, 1)]
    seen = 0
    while stack:
        where, level = stack.pop()
        try:
            with os.scandir(where) as entries:
                for entry in entries:
                    seen += 1
                    if seen > OWN_DIR_SCAN_ENTRIES:
                        return
                    if not want(entry):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if level < depth:
                                stack.append((entry.path, level + 1))
                        elif entry.is_file(follow_symlinks=True):
                            st = entry.stat(follow_symlinks=True)
                            ids.add((st.st_dev, st.st_ino))
                    except OSError:
                        continue
        except OSError:
            continue


def exai_own_files(settings: Settings, environ: Mapping[str, str] | None = None) -> OwnFiles:
    """exai's own files that no tool may read, from the **effective** settings: every file the
    settings were read from (:attr:`~exai.config.Settings.source_files`: TOML, ``.env``, each
    ``*_FILE`` whichever source named it), the TLS key, the audit log, the SQLite file and the
    state directory, plus the credential locations of the home directory. ``environ`` adds
    the ``*_FILE`` variables it names (settings built by hand in tests)."""
    files = [path for _var, path in settings.source_files]
    if settings.tls_key:
        files.append(settings.tls_key)
    for name, value in (environ or {}).items():
        if not value:
            continue
        secret_file = name.endswith("_FILE") and name.startswith(("EXAI_", "KIMI_", "GLM_"))
        if secret_file or name in ("EXAI_CONFIG", "EXAI_ENV_FILE"):
            files.append(value)
    prefixes = [settings.audit_log] if settings.audit_log else []
    url = settings.effective_storage_url
    if url.startswith("sqlite:"):
        from exai.errors import ConfigError
        from exai.storage.sqlite import sqlite_path

        try:
            prefixes.append(str(sqlite_path(url)))
        except ConfigError:
            pass
    home = str(Path.home())
    scan = [os.path.join(home, p) for p in CREDENTIAL_PATHS]

    def absolute(paths: Iterable[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(os.path.abspath(p) for p in paths))

    return OwnFiles(
        files=absolute(files),
        prefixes=absolute(prefixes),
        dirs=absolute([str(settings.state_path)]),
        scan_dirs=absolute(scan),
    )


def context_tokens(model: str | None, default: int = 128_000) -> int:
    """The approximate context window of ``model`` (``provider/model`` accepted); ``default``
    for ``auto`` and unknown models."""
    name = (model or "").rsplit("/", 1)[-1].lower()
    best = ""
    found = default
    for prefix, window in _CONTEXT_TOKENS:
        if name.startswith(prefix) and len(prefix) > len(best):
            best, found = prefix, window
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
    return _DENIED_RE.match(low) is not None


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
        settings: ``effective_file_roots``, ``file_max_bytes``, ``files_max_total_bytes`` and
            everything :func:`exai_own_files` reads.
        environ: more ``*_FILE`` variables whose files are exai's own (default
            ``os.environ``; the settings' own sources are always included).
    """

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None) -> None:
        self.roots: tuple[str, ...] = tuple(settings.effective_file_roots)
        #: with the default roots (the home directory), its hidden entries are refused
        self.home: str | None = None if settings.file_roots else str(Path.home())
        self.max_file_bytes = int(settings.file_max_bytes)
        self.max_total_bytes = int(settings.files_max_total_bytes)
        self._real_roots: tuple[str, ...] | None = None
        self.own = exai_own_files(settings, os.environ if environ is None else environ)
        self._real_own: OwnFiles | None = None
        self._real_home: str | None = None

    def update_settings(self, settings: Settings) -> None:
        """Take exai's own files from reloaded settings (a ``.env`` may name a new tokens file);
        the roots and caps change only with a restart."""
        self.own = exai_own_files(settings)
        self._real_own = None

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
        own = self._own()
        return Path(self._vet(path, field, own, own.identities()).real)

    def _roots(self) -> tuple[str, ...]:
        if self._real_roots is None:
            self._real_roots = tuple(os.path.realpath(r) for r in self.roots)
            if self.home is not None:
                self._real_home = os.path.realpath(self.home)
        return self._real_roots

    def _own(self) -> OwnFiles:
        if self._real_own is None:
            self._real_own = self.own.resolved()
        return self._real_own

    def _vet(
        self, path: str, field: str | None, own: OwnFiles, own_ids: frozenset[tuple[int, int]]
    ) -> _Vetted:
        if not isinstance(path, str) or not path:
            raise _refuse(str(path), "relative", "a file path must be a non-empty string", field)
        if len(path) > MAX_PATH_BYTES or len(path.encode("utf-8", "surrogatepass")) > (
            MAX_PATH_BYTES
        ):
            raise _refuse(
                path, "bad_path", f"the path is longer than {MAX_PATH_BYTES} bytes", field
            )
        if _CONTROL.search(path) is not None:
            raise _refuse(path, "bad_path", "the path contains a control character", field)
        if not path.startswith("/"):
            raise _refuse(
                path, "relative", f"{path!r} is not an absolute path; give the full path", field
            )
        parts = [p for p in path.split("/") if p]
        if len(parts) > MAX_PATH_COMPONENTS:
            raise _refuse(
                path,
                "bad_path",
                f"the path has {len(parts)} components; at most {MAX_PATH_COMPONENTS} are accepted",
                field,
            )
        if ".." in parts:
            raise _refuse(
                path,
                "parent_ref",
                f"{path!r} contains '..'; give the path without parent references",
                field,
            )
        roots = self._roots()
        lexical = os.path.normpath(path)
        try:
            real = os.path.realpath(lexical)
        except (OSError, ValueError):
            raise _refuse(path, "bad_path", f"{path!r} cannot be resolved", field) from None
        for component in (_denied(parts), _denied([c for c in real.split("/") if c])):
            if component is not None:
                raise _refuse(
                    path,
                    "denied_name",
                    f"{path!r} is a credential location ({component!r}); exai never reads "
                    "those (see docs/tools.md)",
                    field,
                )
        if not any(_under(real, r) for r in roots):
            given_roots = (*self.roots, *roots)
            if any(_under(lexical, r) for r in given_roots):
                raise _refuse(
                    path,
                    "symlink_escape",
                    f"{path!r} is a symlink (or under one) that leads outside the allowed "
                    "roots; only symlinks that stay inside the roots are followed",
                    field,
                )
            raise _refuse(
                path,
                "outside_roots",
                f"{path!r} is outside the allowed roots ({', '.join(self.roots)}); "
                "set EXAI_FILE_ROOTS to allow another directory",
                field,
            )
        if own.owns_path(real):
            raise _own_file(path, field)
        if any(_under(real, d) for d in PSEUDO_FILE_SYSTEMS):
            raise _refuse(
                path,
                "system_path",
                f"{path!r} is in a kernel pseudo file system ({real.split('/')[1]!r}: process "
                "environments, memory, devices); exai never reads those",
                field,
            )
        home = self._real_home
        if home is not None and _under(real, home) and real != home:
            first = real[len(home.rstrip("/")) + 1 :].split("/", 1)[0]
            if first.startswith("."):
                raise _refuse(
                    path,
                    "home_hidden",
                    f"{path!r} is under {first!r}, a hidden entry of the home directory, where "
                    "applications keep credentials and state; the default roots leave those "
                    "out (name the directory in EXAI_FILE_ROOTS to allow it)",
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
        if (st.st_dev, st.st_ino) in own_ids:
            raise _own_file(path, field)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _refuse(
                path, "not_a_file", f"{path!r} is {what}; name the files themselves", field
            )
        return _Vetted(path, real, st.st_dev, st.st_ino, st.st_size)

    def _vet_all(
        self, paths: Sequence[str], field: str, *, keep_missing: bool
    ) -> tuple[list[_Vetted | FileAccessError], frozenset[tuple[int, int]]]:
        """Vet ``paths`` (distinct, in order) in this worker thread; linear in their number.

        Stops with the call's cancellation between two paths (the deadline, a cancel, the
        daemon stopping). Returns the vetted files (and, with ``keep_missing``, the
        ``missing``/``not_a_file`` refusals as notes) and the identities of exai's own files.
        """
        own = self._own()
        own_ids = own.identities()
        first: dict[str, int] = {}
        for i, p in enumerate(paths):
            first.setdefault(p, i)
        out: list[_Vetted | FileAccessError] = []
        for p, i in first.items():
            anyio.from_thread.check_cancelled()
            try:
                out.append(self._vet(p, f"{field}[{i}]", own, own_ids))
            except FileAccessError as exc:
                if not keep_missing or exc.extra.get("rule") not in ("missing", "not_a_file"):
                    raise
                out.append(exc)
        return out, own_ids

    @staticmethod
    def _check_count(paths: Sequence[str], field: str) -> None:
        if len(paths) > MAX_PATHS:
            raise InvalidParams(
                f"{field}: at most {MAX_PATHS} paths per call (got {len(paths)}); "
                "name the files that matter",
                field=field,
                data={"max_items": MAX_PATHS},
            )

    async def check(self, paths: Sequence[str], *, field: str = "arguments.files") -> list[Path]:
        """:meth:`resolve` every path in a worker thread; the resolved paths.

        Raises:
            InvalidParams: more than :data:`MAX_PATHS` paths.
            FileAccessError: the first refused path, with ``data.field`` = ``field[i]``.
        """
        self._check_count(paths, field)
        if not paths:
            return []
        vetted, _ids = await anyio.to_thread.run_sync(
            lambda: self._vet_all(paths, field, keep_missing=False),
            limiter=FILE_LIMITER,
            abandon_on_cancel=True,
        )
        return [Path(v.real) for v in vetted if isinstance(v, _Vetted)]

    # -- reading -------------------------------------------------------------------------
    async def read(
        self, paths: Sequence[str], *, token_budget: int, field: str = "arguments.files"
    ) -> FilesBlock:
        """Read ``paths`` (duplicates once, in order) into a :class:`FilesBlock`.

        Args:
            paths: absolute paths, at most :data:`MAX_PATHS`.
            token_budget: tokens the text may take (≈ :data:`CHARS_PER_TOKEN` chars each).
            field: how the paths are named in errors (``arguments.relevant_files``).

        Raises:
            InvalidParams: more than :data:`MAX_PATHS` paths (nothing is looked at then).
            FileAccessError: a path breaks a sandbox rule (nothing is read then).
        """
        self._check_count(paths, field)
        if not paths:
            return FilesBlock()
        vetted, own_ids = await anyio.to_thread.run_sync(
            lambda: self._vet_all(paths, field, keep_missing=True),
            limiter=FILE_LIMITER,
            abandon_on_cancel=True,
        )
        chars_left = tokens.chars_for(token_budget)
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
                _read_one,
                item,
                cap,
                chars_left,
                own_ids,
                limiter=FILE_LIMITER,
                abandon_on_cancel=True,
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
            InvalidParams: more than :data:`MAX_PATHS` paths.
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
            "max_paths": MAX_PATHS,
        }


def _own_file(path: str, field: str | None) -> FileAccessError:
    return _refuse(
        path,
        "exai_secret",
        f"{path!r} is one of exai's own files (secrets, state, audit log or configuration), "
        "or a link to one; tools never read those",
        field,
    )


def _message(exc: FileAccessError) -> str:
    text = str(exc)
    field = exc.extra.get("field")
    prefix = f"{field}: " if field else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _read_one(
    item: _Vetted, cap: int, chars_left: int, own_ids: frozenset[tuple[int, int]]
) -> tuple[str | None, int, str | None]:
    """Read and render one vetted file (in a worker thread).

    The opened descriptor is checked (``fstat``) to be the vetted inode and none of exai's own
    files, so nothing swapped in after the vetting is read.

    Returns ``(text or None when skipped, bytes counted against the call, note or None)``.

    Raises:
        FileAccessError: the file changed since it was vetted, or it is one of exai's own.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(item.real, flags)
    except OSError as exc:
        return None, 0, f"skipped {item.given}: cannot open it ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in own_ids:
            raise _own_file(item.given, None)
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
