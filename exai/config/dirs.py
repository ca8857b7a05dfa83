"""Directories exai creates: every one through :func:`make_dirs`, with an explicit mode.

``Path.mkdir(mode=…, parents=True)`` gives the mode only to the last directory, and that mode
is masked by the process's umask; the parents it creates get ``0o777`` less the umask. Under
``umask 0`` (a service manager's default for some setups, a shell that set it) the state
directory's parents, the audit log's directory and the rest came out ``0777``: any local
account could replace or add files in them (the SQLite store, the spool, the kept
session-signing key, the audit log). :func:`make_dirs` creates each missing directory, the
parents included, with the mode asked for — ``chmod`` after ``mkdir``, since ``mkdir``'s own
mode is masked — and never changes a directory that already exists: one the operator made
keeps the mode they gave it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "make_dirs"]

#: the mode of a directory that holds the daemon's state, logs or secrets
PRIVATE_DIR_MODE = 0o700


def make_dirs(path: str | os.PathLike[str], mode: int = PRIVATE_DIR_MODE) -> None:
    """Create the directory ``path`` and its missing parents, each with exactly ``mode``
    whatever the umask; a directory that exists (followed through a symbolic link) is left as
    it is. Blocking (a few system calls): call it off the event loop.

    Raises:
        OSError: a directory cannot be created, or a component exists and is not a directory
            (``FileExistsError`` for ``path`` itself, ``NotADirectoryError`` for a parent).
    """
    target = Path(path)
    missing: list[Path] = []
    here = target
    while True:
        try:
            st = os.stat(here)
        except FileNotFoundError:
            missing.append(here)
            if here.parent == here:
                break
            here = here.parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise FileExistsError(f"{here} exists and is not a directory")
        break
    for directory in reversed(missing):
        try:
            # masked by the umask: never looser than ``mode``, so there is no moment when the
            # new directory is more open than asked for
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # (made meanwhile by someone else, another daemon: theirs as it is)
        # the bits the umask took away, on the directory just made (not on a link put in its
        # place meanwhile: opened without following one)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
