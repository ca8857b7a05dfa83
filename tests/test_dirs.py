"""Every directory exai creates is made with an explicit mode whatever the umask
(:func:`exai.config.dirs.make_dirs`), and one that exists is left as it is."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exai.cli import service
from exai.client import autostart
from exai.server.audit import AuditLog
from exai.server.mcp_sessions import STORED_KEY_FILE, stored_key
from exai.storage.spool import open_spool
from exai.storage.sqlite import SQLiteStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.anyio
async def test_under_umask_0_no_directory_exai_creates_is_open_to_others(
    tmp_path: Path, umask_0: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``umask 0`` the parents ``mkdir(parents=True)`` made were 0777, and so were the
    audit log's and a service unit's directories (made with no mode at all): any local account
    could put or replace files where the daemon keeps its store, spool, signing key and audit
    log. Each directory made (the parents included) is now 0700 — a service unit's 0755 — and
    the autostarted daemon's log and pid file 0600."""
    made: dict[str, Path] = {}
    async with SQLiteStore(tmp_path / "db1" / "db2" / "exai.sqlite3", ttl_s=60.0):
        made |= {"db1": tmp_path / "db1", "db2": tmp_path / "db1" / "db2"}
    async with open_spool(tmp_path / "sp1" / "sp2", "exai", max_bytes=1 << 20):
        made |= {"sp1": tmp_path / "sp1", "sp2": tmp_path / "sp1" / "sp2"}
    async with AuditLog(str(tmp_path / "log1" / "log2" / "audit.log")):
        made |= {"log1": tmp_path / "log1", "log2": tmp_path / "log1" / "log2"}
    assert stored_key(tmp_path / "st1" / "st2") is not None
    made |= {"st1": tmp_path / "st1", "st2": tmp_path / "st1" / "st2"}
    state = tmp_path / "as1" / "as2"
    os.close(autostart._open_lock(state))
    made |= {"as1": tmp_path / "as1", "as2": state}
    # the autostarted daemon's log and pid file (a process that exits at once stands for it)
    monkeypatch.setattr(autostart, "exai_words", lambda: [sys.executable, "-c", "pass"])
    autostart._spawn(state, "127.0.0.1", 9).wait()
    config = tmp_path / "cfg"
    environ = {
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(config),
        "EXAI_STATE_DIR": str(tmp_path / "unit-state"),
    }
    assert service.run("install", kind="systemd", start=False, environ=environ) == 0

    modes = {name: oct(_mode(path)) for name, path in made.items()}
    assert modes == {name: oct(0o700) for name in made}, modes
    units = [config, config / "systemd", config / "systemd" / "user"]
    assert [oct(_mode(p)) for p in units] == [oct(0o755)] * 3
    files = [
        tmp_path / "st1" / "st2" / STORED_KEY_FILE,
        state / autostart.LOCK_NAME,
        state / autostart.LOG_NAME,
        state / autostart.PID_NAME,
    ]
    assert [oct(_mode(f)) for f in files] == [oct(0o600)] * 4


def test_make_dirs_never_changes_a_directory_that_exists(tmp_path: Path, umask_0: None) -> None:
    """The operator's directory keeps its mode (looser or tighter); only what is made gets the
    mode asked for; a file in the way is an error."""
    from exai.config.dirs import make_dirs

    mine = tmp_path / "operators"
    mine.mkdir()
    mine.chmod(0o751)
    make_dirs(mine / "a" / "b")
    assert _mode(mine) == 0o751
    assert (_mode(mine / "a"), _mode(mine / "a" / "b")) == (0o700, 0o700)
    (mine / "a").chmod(0o711)
    make_dirs(mine / "a" / "b", 0o755)  # (all there: nothing changes)
    assert (_mode(mine / "a"), _mode(mine / "a" / "b")) == (0o711, 0o700)
    (tmp_path / "file").write_text("")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        make_dirs(tmp_path / "file" / "x")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file")
