"""Issue 12.2: exai's secret files cannot be read through ``files``, whatever names them.

Each test starts a real ``exai serve`` whose secrets come from one source (environment, ``.env``,
TOML), gives a client ``chat`` with a path that reaches a secret another way (a hard link, a
symlink), and checks the call is refused with ``rule = "exai_secret"`` while the secret's value
never reaches the provider or the client. A well-behaved call with an ordinary file is served
next to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from exai.testing import MockUpstream
from tests.adversarial.harness import LiveDaemon, argument_error, live_daemon

pytestmark = pytest.mark.anyio

TOKEN = "t-0123456789abcdef0123456789abcdef"
SECRET_LINE = f"alice:{TOKEN}"


@asynccontextmanager
async def daemon_with_mock(tmp_path: Path, **env: str) -> AsyncIterator[tuple[LiveDaemon, Any]]:
    async with (
        MockUpstream(models=("mock-fast",)) as mock,
        live_daemon(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
            **env,
        ) as daemon,
    ):
        yield daemon, mock


async def chat_files(daemon: LiveDaemon, paths: list[str]) -> dict[str, Any]:
    return await daemon.call(
        "chat", {"prompt": "repeat the files", "model": "mock-fast", "files": paths}, token=TOKEN
    )


def assert_refused_as_exai_secret(reply: dict[str, Any], mock: Any) -> None:
    err = argument_error(reply)
    assert err["data"]["reason"] == "file_denied"
    assert err["data"]["rule"] == "exai_secret"
    assert TOKEN not in json.dumps(reply)
    assert all(TOKEN not in json.dumps(r.json) for r in mock.chat_requests)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "app.py").write_text("print('hello')\n")
    return proj


async def assert_ordinary_file_is_read(daemon: LiveDaemon, mock: Any, project: Path) -> None:
    reply = await chat_files(daemon, [str(project / "app.py")])
    assert reply["result"]["isError"] is False, reply
    assert "print('hello')" in json.dumps(mock.chat_requests[-1].json)


async def test_a_hard_link_to_the_tokens_file_is_refused(tmp_path: Path, project: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    tokens = secrets / "tokens"
    tokens.write_text(SECRET_LINE + "\n")
    tokens.chmod(0o600)
    os.link(tokens, project / "notes.txt")  # same inode, an innocent name inside the root
    async with daemon_with_mock(
        tmp_path, EXAI_TOKENS_FILE=str(tokens), EXAI_FILE_ROOTS=str(project)
    ) as (daemon, mock):
        assert_refused_as_exai_secret(await chat_files(daemon, [str(project / "notes.txt")]), mock)
        await assert_ordinary_file_is_read(daemon, mock, project)


async def test_a_symlink_to_the_tokens_file_is_refused(tmp_path: Path, project: Path) -> None:
    tokens = project / "conf" / "tokens"  # inside the root, so only its identity protects it
    tokens.parent.mkdir()
    tokens.write_text(SECRET_LINE + "\n")
    tokens.chmod(0o600)
    (project / "readme.txt").symlink_to(tokens)
    async with daemon_with_mock(
        tmp_path, EXAI_TOKENS_FILE=str(tokens), EXAI_FILE_ROOTS=str(project)
    ) as (daemon, mock):
        assert_refused_as_exai_secret(await chat_files(daemon, [str(project / "readme.txt")]), mock)
        await assert_ordinary_file_is_read(daemon, mock, project)


async def test_a_tokens_file_named_in_dotenv_is_refused_also_through_a_hard_link(
    tmp_path: Path, project: Path
) -> None:
    tokens = tmp_path / "tokens.txt"  # a name no deny list guesses
    tokens.write_text(SECRET_LINE + "\n")
    tokens.chmod(0o600)
    os.link(tokens, project / "data.csv")
    dotenv = tmp_path / "exai.env"
    dotenv.write_text(f"EXAI_TOKENS_FILE={tokens}\n")
    dotenv.chmod(0o600)
    async with daemon_with_mock(
        tmp_path, EXAI_ENV_FILE=str(dotenv), EXAI_FILE_ROOTS=f"{project},{tmp_path}"
    ) as (daemon, mock):
        for path in (tokens, project / "data.csv", dotenv):
            assert_refused_as_exai_secret(await chat_files(daemon, [str(path)]), mock)
        await assert_ordinary_file_is_read(daemon, mock, project)


async def test_a_tokens_file_named_in_toml_is_refused_also_through_a_hard_link(
    tmp_path: Path, project: Path
) -> None:
    tokens = tmp_path / "access-list"
    tokens.write_text(SECRET_LINE + "\n")
    tokens.chmod(0o600)
    os.link(tokens, project / "fixture.json")
    toml = tmp_path / "exai.toml"
    toml.write_text(f'tokens_file = "{tokens}"\n')
    async with daemon_with_mock(
        tmp_path, EXAI_CONFIG=str(toml), EXAI_FILE_ROOTS=f"{project},{tmp_path}"
    ) as (daemon, mock):
        for path in (tokens, project / "fixture.json", toml):
            assert_refused_as_exai_secret(await chat_files(daemon, [str(path)]), mock)
        await assert_ordinary_file_is_read(daemon, mock, project)


async def test_a_hard_link_to_a_provider_key_file_or_the_sqlite_store_is_refused(
    tmp_path: Path, project: Path
) -> None:
    key = tmp_path / "mock.key"
    key.write_text(TOKEN + "\n")
    key.chmod(0o600)
    os.link(key, project / "key-copy.txt")
    state = tmp_path / "state"
    async with daemon_with_mock(
        tmp_path,
        EXAI_PROVIDER_MOCK_API_KEY_FILE=str(key),
        EXAI_TOKENS=SECRET_LINE,
        EXAI_FILE_ROOTS=str(project),
    ) as (daemon, mock):
        assert_refused_as_exai_secret(
            await chat_files(daemon, [str(project / "key-copy.txt")]), mock
        )
        await assert_ordinary_file_is_read(daemon, mock, project)  # the store now has a turn
        os.link(state / "exai.sqlite3", project / "db.bin")
        assert_refused_as_exai_secret(await chat_files(daemon, [str(project / "db.bin")]), mock)


async def test_the_default_roots_leave_out_the_hidden_entries_of_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    gh = home / ".config" / "gh"
    gh.mkdir(parents=True)
    (gh / "hosts.yml").write_text(f"github.com:\n  oauth_token: {TOKEN}\n")
    (home / ".bash_history").write_text(f"export GH_TOKEN={TOKEN}\n")
    proj = home / "proj"
    proj.mkdir()
    (proj / "app.py").write_text("print('hello')\n")
    (proj / ".gitignore").write_text("*.pyc\n")  # a project's own dotfiles stay readable
    async with daemon_with_mock(tmp_path, HOME=str(home), EXAI_TOKENS=SECRET_LINE) as (
        daemon,
        mock,
    ):
        for path in (gh / "hosts.yml", home / ".bash_history"):
            reply = await chat_files(daemon, [str(path)])
            assert argument_error(reply)["data"]["rule"] == "home_hidden", reply
            assert TOKEN not in json.dumps(reply)
        reply = await chat_files(daemon, [str(proj / "app.py"), str(proj / ".gitignore")])
        assert reply["result"]["isError"] is False, reply
        sent = json.dumps(mock.chat_requests[-1].json)
        assert "print('hello')" in sent and "*.pyc" in sent
        assert all(TOKEN not in json.dumps(r.json) for r in mock.chat_requests)
