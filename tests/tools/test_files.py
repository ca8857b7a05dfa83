"""The file sandbox: which paths are read, how much of them, and how cuts are shown.

Unit tests run :class:`exai.tools.sandbox.FileSandbox` on a temporary root; the last tests go
through the daemon (``chat`` and a workflow) against a mock upstream to show the same rules there.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs
import pytest

from exai.config import Settings
from exai.errors import FileAccessError, InvalidParams
from exai.testing import MockUpstream
from exai.tools.sandbox import (
    MAX_PATH_BYTES,
    MAX_PATH_COMPONENTS,
    MAX_PATHS,
    FileSandbox,
    context_tokens,
)
from tests.helpers import make_settings
from tests.tools.suite import error_of, prompts, suite_env

pytestmark = pytest.mark.anyio


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "src").mkdir()
    (r / "src" / "app.py").write_text("print('hello')\n")
    return r


def sandbox(tmp_path: Path, root: Path, **kw: object) -> FileSandbox:
    return FileSandbox(make_settings(tmp_path, file_roots=(str(root),), **kw))


def refused(box: FileSandbox, path: str) -> FileAccessError:
    with pytest.raises(FileAccessError) as info:
        box.resolve(path)
    return info.value


# -- which paths ------------------------------------------------------------------------------


def test_a_file_under_the_root_resolves(tmp_path, root):
    box = sandbox(tmp_path, root)
    assert box.resolve(str(root / "src" / "app.py")) == (root / "src" / "app.py").resolve()


def test_a_relative_path_is_refused(tmp_path, root):
    err = refused(sandbox(tmp_path, root), "src/app.py")
    assert err.extra["rule"] == "relative"
    assert "not an absolute path" in str(err)


def test_a_parent_reference_is_refused_even_when_it_stays_inside(tmp_path, root):
    box = sandbox(tmp_path, root)
    err = refused(box, f"{root}/src/../src/app.py")
    assert err.extra["rule"] == "parent_ref"
    assert refused(box, f"{root}/../../etc/passwd").extra["rule"] == "parent_ref"


def test_a_path_outside_the_roots_is_refused_naming_the_setting(tmp_path, root):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("x")
    err = refused(sandbox(tmp_path, root), str(outside))
    assert err.extra["rule"] == "outside_roots"
    assert "EXAI_FILE_ROOTS" in str(err)
    assert err.code == -32602 and err.reason == "file_denied"


def test_a_sibling_directory_sharing_the_roots_prefix_is_outside(tmp_path, root):
    twin = tmp_path / "root-evil"
    twin.mkdir()
    (twin / "x.py").write_text("x")
    assert refused(sandbox(tmp_path, root), str(twin / "x.py")).extra["rule"] == "outside_roots"


def test_a_symlink_leading_out_of_the_root_is_refused(tmp_path, root):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (root / "innocent.txt").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path)
    box = sandbox(tmp_path, root)
    err = refused(box, str(root / "innocent.txt"))
    assert err.extra["rule"] == "symlink_escape"
    assert "symlink" in str(err)
    assert refused(box, str(root / "linkdir" / "secret.txt")).extra["rule"] == "symlink_escape"


def test_a_symlink_staying_inside_the_root_is_followed(tmp_path, root):
    (root / "current").symlink_to(root / "src")
    box = sandbox(tmp_path, root)
    assert box.resolve(str(root / "current" / "app.py")) == (root / "src" / "app.py").resolve()


@pytest.mark.parametrize(
    "rel",
    [
        ".ssh/id_ed25519",
        ".aws/credentials",
        ".gnupg/pubring.kbx",
        ".netrc",
        ".env",
        ".env.production",
        "proj/.env.local",
        ".docker/config.json",
        ".kube/config",
        ".git-credentials",
        ".pypirc",
        "keys/id_rsa.pub",
        "tls/server.pem",
        "tls/server.KEY",
    ],
)
def test_credential_locations_are_refused(tmp_path, root, rel):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("secret")
    err = refused(sandbox(tmp_path, root), str(path))
    assert err.extra["rule"] == "denied_name"
    assert "credential" in str(err)


def test_a_symlink_inside_the_root_to_a_credential_is_refused(tmp_path, root):
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id_rsa").write_text("KEY")
    (root / "notes.txt").symlink_to(root / ".ssh" / "id_rsa")
    assert refused(sandbox(tmp_path, root), str(root / "notes.txt")).extra["rule"] == "denied_name"


@pytest.mark.parametrize("rel", [".env.example", ".docker/Dockerfile", "src/env.py"])
def test_lookalikes_of_credential_names_are_allowed(tmp_path, root, rel):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("FOO=\n")
    assert sandbox(tmp_path, root).resolve(str(path)) == path.resolve()


def test_a_directory_or_fifo_is_not_a_file(tmp_path, root):
    box = sandbox(tmp_path, root)
    assert refused(box, str(root / "src")).extra["rule"] == "not_a_file"
    os.mkfifo(root / "pipe")
    assert refused(box, str(root / "pipe")).extra["rule"] == "not_a_file"


def test_control_characters_in_a_path_are_refused(tmp_path, root):
    assert refused(sandbox(tmp_path, root), f"{root}/a\x00b").extra["rule"] == "bad_path"


# -- how much ---------------------------------------------------------------------------------


async def test_read_wraps_each_file_with_line_numbers(tmp_path, root):
    block = await sandbox(tmp_path, root).read([str(root / "src" / "app.py")], token_budget=1000)
    assert f"--- BEGIN FILE: {root}/src/app.py (1 lines) ---" in block.text
    assert "    1│ print('hello')" in block.text
    assert block.files == (str(root / "src" / "app.py"),)
    assert block.notes == ()


async def test_an_oversized_file_is_truncated_with_a_visible_notice(tmp_path, root):
    big = root / "big.log"
    big.write_text("line\n" * 1000)  # 5000 bytes
    box = sandbox(tmp_path, root, file_max_bytes=1000)
    block = await box.read([str(big)], token_budget=100_000)
    assert "[… truncated: file is 5000 bytes, showing the first 1000" in block.text
    assert block.text.count("│ line") == 200
    assert block.notes and "truncated" in block.notes[0]


async def test_a_truncation_never_splits_a_multibyte_character(tmp_path, root):
    f = root / "utf8.txt"
    f.write_text("é" * 100)  # 200 bytes
    block = await sandbox(tmp_path, root, file_max_bytes=101).read([str(f)], token_budget=10_000)
    assert "é" * 50 in block.text and "truncated" in block.text


async def test_the_calls_total_cap_skips_the_files_beyond_it_with_a_note(tmp_path, root):
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_text("x" * 600)
    box = sandbox(tmp_path, root, files_max_total_bytes=1000)
    block = await box.read([str(root / n) for n in ("a.txt", "b.txt", "c.txt")], token_budget=10**6)
    assert block.files == (str(root / "a.txt"), str(root / "b.txt"))
    assert "truncated: file is 600 bytes, showing the first 400" in block.text
    assert any("c.txt" in n and "used up" in n for n in block.notes)


async def test_a_binary_file_is_skipped_with_a_note(tmp_path, root):
    blob = root / "image.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    block = await sandbox(tmp_path, root).read(
        [str(blob), str(root / "src" / "app.py")], token_budget=10_000
    )
    assert block.files == (str(root / "src" / "app.py"),)
    assert f"[skipped {blob}: binary file" in block.text
    assert any("binary" in n for n in block.notes)


async def test_a_file_that_is_not_utf8_is_skipped_with_a_note(tmp_path, root):
    latin = root / "latin1.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    block = await sandbox(tmp_path, root).read([str(latin)], token_budget=10_000)
    assert block.files == ()
    assert "not UTF-8 text" in block.text


async def test_contents_are_fitted_to_the_token_budget_with_a_notice(tmp_path, root):
    f = root / "long.py"
    f.write_text("".join(f"value_{i} = {i}\n" for i in range(2000)))
    block = await sandbox(tmp_path, root).read([str(f)], token_budget=500)
    assert len(block.text) <= 500 * 4
    assert "[… truncated to fit the model's token budget: showing lines 1–" in block.text
    assert "of 2000 …]" in block.text


async def test_a_missing_file_becomes_a_note_but_a_denied_one_fails_the_read(tmp_path, root):
    box = sandbox(tmp_path, root)
    block = await box.read([str(root / "gone.py")], token_budget=1000)
    assert "does not exist" in block.text and block.files == ()
    with pytest.raises(FileAccessError) as info:
        await box.read([str(root / "src" / "app.py"), str(tmp_path / "x")], token_budget=1000)
    assert info.value.extra["field"] == "arguments.files[1]"


async def test_the_default_root_is_the_home_directory(tmp_path):
    box = FileSandbox(attrs.evolve(make_settings(tmp_path), file_roots=()))
    assert box.roots == (str(Path.home()),)


def test_known_models_have_context_windows_and_unknown_ones_a_default():
    assert context_tokens("kimi-k2-0905-preview") == 256_000
    assert context_tokens("glm/glm-4.5-flash") == 128_000
    assert context_tokens("auto") == 128_000


# -- through the daemon -----------------------------------------------------------------------


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(models=("mock-fast", "mock-pro")) as m:
        yield m


async def test_chat_embeds_an_allowed_file_and_refuses_an_escape(tmp_path, mock):
    async with suite_env(tmp_path, {"a": mock}, fast=("mock-fast",), quality=("mock-pro",)) as env:
        code = env.root / "util.py"
        code.write_text("CONTENT-MARKER = 1\n")
        await env.ok("chat", {"prompt": "explain", "files": [str(code)]})
        assert "CONTENT-MARKER" in prompts(mock)[0]
        outside = tmp_path / "outside.py"
        outside.write_text("x")
        (env.root / "link.py").symlink_to(outside)
        err = error_of(
            await env.call("chat", {"prompt": "p", "files": [str(env.root / "link.py")]})
        )
        assert err["code"] == -32602
        assert err["data"]["rule"] == "symlink_escape"
        assert len(mock.chat_requests) == 1


async def test_a_workflow_final_step_shows_the_truncation_notice_to_the_model(tmp_path, mock):
    async with suite_env(
        tmp_path,
        {"a": mock},
        fast=("mock-fast",),
        quality=("mock-pro",),
        file_max_bytes=2000,
    ) as env:
        big = env.root / "big.py"
        big.write_text("x = 1\n" * 1000)
        res = await env.ok(
            "analyze",
            {
                "step": "look",
                "step_number": 1,
                "total_steps": 1,
                "next_step_required": False,
                "findings": "big file",
                "relevant_files": [str(big)],
            },
        )
    assert "[… truncated: file is 6000 bytes, showing the first 2000" in prompts(mock)[0]
    assert any("truncated" in n for n in res["file_notes"])


def test_exais_own_secret_state_and_audit_files_are_refused(tmp_path, root):
    key_file = root / "conf" / "kimi_api_key"
    tokens_file = root / "conf" / "tokens"
    key_file.parent.mkdir()
    for f in (key_file, tokens_file, root / "audit.log"):
        f.write_text("secret-ish\n")
    state = root / "state"
    (state / "spool").mkdir(parents=True)
    (state / "exai.sqlite3").write_text("db")
    box = FileSandbox(
        make_settings(
            tmp_path,
            file_roots=(str(root),),
            state_dir=str(state),
            audit_log=str(root / "audit.log"),
        ),
        environ={"KIMI_API_KEY_FILE": str(key_file), "EXAI_TOKENS_FILE": str(tokens_file)},
    )
    for path in (key_file, tokens_file, root / "audit.log", state / "exai.sqlite3"):
        assert refused(box, str(path)).extra["rule"] == "exai_secret"
    assert box.resolve(str(root / "src" / "app.py"))  # everything else still reads


async def test_vetting_stops_between_two_paths_once_its_call_is_cancelled(
    tmp_path, root, monkeypatch
):
    # a slow disk: each path takes a while to vet; the call is cancelled (its deadline) early
    box = sandbox(tmp_path, root)
    vetted: list[str] = []
    real_vet = FileSandbox._vet

    def slow_vet(self: FileSandbox, path: str, *args: object) -> object:
        vetted.append(path)
        time.sleep(0.02)
        return real_vet(self, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FileSandbox, "_vet", slow_vet)
    paths = [str(root / f"missing-{i}.py") for i in range(100)]
    with anyio.move_on_after(0.1) as scope:
        await box.read(paths, token_budget=1000)
    assert scope.cancelled_caught
    with anyio.fail_after(10):  # the worker thread notices at its next path, then stops
        while True:
            seen = len(vetted)
            await anyio.sleep(0.2)
            if len(vetted) == seen:
                break
    assert len(vetted) < len(paths)


async def test_more_paths_than_the_cap_are_refused_before_any_is_looked_at(tmp_path, root):
    box = sandbox(tmp_path, root)
    with pytest.raises(InvalidParams) as info:
        await box.read([str(root / f"f{i}") for i in range(MAX_PATHS + 1)], token_budget=10)
    assert info.value.extra == {"field": "arguments.files", "max_items": MAX_PATHS}
    with pytest.raises(InvalidParams):
        await box.check([str(root)] * (MAX_PATHS + 1), field="arguments.relevant_files")


def test_a_path_too_long_or_with_too_many_components_is_refused_before_it_is_resolved(
    tmp_path, root
):
    box = sandbox(tmp_path, root)
    assert refused(box, str(root) + "/x" * MAX_PATH_BYTES).extra["rule"] == "bad_path"
    assert refused(box, str(root) + "/x" * MAX_PATH_COMPONENTS).extra["rule"] == "bad_path"


def test_every_array_in_every_tool_schema_has_a_cap():
    from exai.tools import default_registry

    registry = default_registry()
    unbounded = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if (kind == "array" or (isinstance(kind, list) and "array" in kind)) and (
                "maxItems" not in node
            ):
                unbounded.append(where)
            for key, child in node.items():
                walk(child, f"{where}.{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]")

    for name in registry.names():
        spec = registry.get(name)
        assert spec is not None
        walk(spec.input_schema, name)
    assert unbounded == []


def test_own_files_are_known_by_identity_even_under_another_name(tmp_path, root):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:t-0123456789abcdef0123456789abcdef\n")
    settings = Settings.from_env(
        {"EXAI_TOKENS_FILE": str(tokens), "EXAI_STATE_DIR": str(tmp_path / "state")},
        env_file="",
        config_file="",
    )
    box = FileSandbox(attrs.evolve(settings, file_roots=(str(root),)), environ={})
    os.link(tokens, root / "innocent.txt")
    assert refused(box, str(root / "innocent.txt")).extra["rule"] == "exai_secret"


@pytest.mark.parametrize(
    "path",
    ["/proc/self/environ", f"/proc/{os.getpid()}/cmdline", "/sys/kernel/hostname"],
    # (ids without the pid: pytest-xdist's workers must collect the same names)
    ids=["proc-self-environ", "proc-pid-cmdline", "sys-kernel-hostname"],
)
def test_kernel_pseudo_files_are_refused_even_under_a_root_of_slash(tmp_path, path):
    box = FileSandbox(make_settings(tmp_path, file_roots=("/",)), environ={})
    assert refused(box, path).extra["rule"] == "system_path"
