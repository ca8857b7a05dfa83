"""Secret rotation without restart: tokens file changes and SIGHUP-style reloads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected

from exai.config import Settings
from exai.server.app import serve
from exai.server.reload import watched_files
from tests.helpers import Rpc, make_settings, ws

pytestmark = pytest.mark.anyio

TOK_A = "alice:tok-alice-000000000000000000000001"
TOK_B = "bob:tok-bob-00000000000000000000000000002"
TOK_C = "carol:tok-carol-0000000000000000000000003"
#: bounds that only turn a hang into a failure
HANG_GUARD_S = 30.0


def bearer(entry: str) -> str:
    return entry.split(":", 1)[1]


def write(path: Path, *entries: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(entries) + "\n")
    tmp.replace(path)  # atomic, as a deploy tool would do


async def start(nursery: trio.Nursery, tmp_path: Path, env: dict[str, str]) -> Any:
    def load() -> Settings:
        base = Settings.from_env(env, env_file="", config_file="")
        import attrs

        return attrs.evolve(base, port=0, admin_port=0, state_dir=str(tmp_path / "state"))

    first = load()
    settings = make_settings(
        tmp_path,
        tokens=first.tokens,
        session_signing_key=first.session_signing_key,
        secret_watch_interval_s=0.05,
    )
    return await nursery.start(
        lambda task_status: serve(
            settings,
            announce=False,
            reload=load,
            reload_environ=env,
            task_status=task_status,
        )
    )


async def test_tokens_file_change_admits_new_keeps_old_and_closes_revoked_sessions(tmp_path):
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A, TOK_B)
    env = {"EXAI_TOKENS_FILE": str(tokens_file)}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        async with ws(d, token=bearer(TOK_A)) as sa, ws(d, token=bearer(TOK_B)) as sb:
            with pytest.raises(ConnectionRejected):
                async with ws(d, token=bearer(TOK_C)):
                    pass
            write(tokens_file, TOK_A, TOK_C)  # bob removed, carol added
            with trio.fail_after(HANG_GUARD_S):
                while d.reloader.reloads == 0:
                    await trio.sleep(0.02)
            # bob's session is closed with a clear reason
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(HANG_GUARD_S):
                while True:
                    await sb.get_message()
            assert info.value.reason.code == 4001
            assert info.value.reason.reason == "token revoked"
            # alice's session stays up
            assert (await Rpc(sa).request("ping"))["result"] == {}
            # carol is admitted, bob is not
            async with ws(d, token=bearer(TOK_C)) as sc:
                assert (await Rpc(sc).request("ping"))["result"] == {}
            with pytest.raises(ConnectionRejected):
                async with ws(d, token=bearer(TOK_B)):
                    pass
        d.request_shutdown()


async def test_the_daemon_is_ready_only_once_it_has_looked_at_its_secret_files(
    tmp_path, monkeypatch
):
    """The secret watcher's first look at the files (what a change is compared with) is taken
    before the daemon reports ready. It was taken after, by a worker thread: on a busy machine
    that ran late, saw a tokens file changed just after start-up as its starting point, and
    the change was never reloaded (test_tokens_file_change... timed out in make test). Here
    that first look is held until every task waits: the daemon must not be ready by then."""
    from exai.server import reload as reload_module

    real = reload_module._fingerprints
    entered, allow = threading.Event(), threading.Event()

    def first_look_held(paths: list[Path]) -> Any:
        if not entered.is_set():
            entered.set()
            allow.wait(HANG_GUARD_S)
        return real(paths)

    monkeypatch.setattr(reload_module, "_fingerprints", first_look_held)
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    started = False
    ready_during_first_look: list[bool] = []

    async def release_the_first_look() -> None:
        with trio.fail_after(HANG_GUARD_S):
            while not entered.is_set():
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        ready_during_first_look.append(started)
        allow.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_the_first_look)
        d = await start(nursery, tmp_path, {"EXAI_TOKENS_FILE": str(tokens_file)})
        started = True
        with trio.fail_after(HANG_GUARD_S):
            while not ready_during_first_look:
                await trio.sleep(0.01)
        d.request_shutdown()
    assert ready_during_first_look == [False]


async def test_reload_that_fails_validation_keeps_the_old_tokens(tmp_path):
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file)}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        write(tokens_file, "sha256:not-hex")
        ok = await d.reloader.reload("test")
        assert ok is False
        assert d.reloader.failures == 1
        async with ws(d, token=bearer(TOK_A)) as conn:
            assert (await Rpc(conn).request("ping"))["result"] == {}
        d.request_shutdown()


async def test_a_reload_that_would_remove_every_token_keeps_authentication_on(tmp_path):
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file)}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        write(tokens_file)  # emptied
        assert await d.reloader.reload("test") is False
        with pytest.raises(ConnectionRejected):
            async with ws(d):  # no token: still refused
                pass
        d.request_shutdown()


async def test_a_tokens_file_named_in_dotenv_is_watched_and_rotated(tmp_path):
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    dotenv = tmp_path / "exai.env"
    dotenv.write_text(f"EXAI_TOKENS_FILE={tokens_file}\n")

    def load() -> Settings:
        import attrs

        base = Settings.from_env({}, env_file=str(dotenv), config_file="")
        return attrs.evolve(
            base, port=0, admin_port=0, state_dir=str(tmp_path / "state"),
            secret_watch_interval_s=0.05,
        )  # fmt: skip

    async with trio.open_nursery() as nursery:
        d = await nursery.start(
            lambda task_status: serve(
                load(), announce=False, reload=load, reload_environ={}, task_status=task_status
            )
        )
        with trio.fail_after(5):
            while d.reloader.reloads == 0:
                # named only in the .env file, not in the environment (written again until the
                # watcher, which takes its first look in a thread, has seen a change)
                write(tokens_file, TOK_A, TOK_B)
                await trio.sleep(0.2)
        async with ws(d, token=bearer(TOK_B)) as sb:
            assert (await Rpc(sb).request("ping"))["result"] == {}
        d.request_shutdown()


async def test_a_rotated_session_signing_key_ends_the_sessions_signed_with_the_old_one(tmp_path):
    from tests.httpmcp import mcp_http

    key_file = tmp_path / "signing.key"
    key_file.write_text("k" * 40 + "\n")
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file), "EXAI_SESSION_SIGNING_KEY_FILE": str(key_file)}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        async with mcp_http(d.url, token=bearer(TOK_A)) as old:
            await old.initialize()
            assert (await old.post(old.message("ping"))).status_code == 200
            tmp = key_file.with_suffix(".tmp")
            tmp.write_text("n" * 40 + "\n")
            tmp.replace(key_file)
            assert await d.reloader.reload("test")
            assert (await old.post(old.message("ping"))).status_code == 404
        async with mcp_http(d.url, token=bearer(TOK_A)) as new:
            await new.initialize()  # a new session, signed with the new key
            assert (await new.post(new.message("ping"))).status_code == 200
        d.request_shutdown()


async def test_a_session_signing_key_taken_out_of_the_files_is_named_as_awaiting_the_restart(
    tmp_path,
):
    """A reload whose files no longer set EXAI_SESSION_SIGNING_KEY (nor its _FILE) leaves the
    daemon signing with the key it has — its sessions go on — but it was named nowhere: status
    (and so `exai config`) said nothing, while the restart will take another key (the state
    directory's) and end every session."""
    from tests.httpmcp import mcp_http

    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file), "EXAI_SESSION_SIGNING_KEY": "k" * 40}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        async with mcp_http(d.url, token=bearer(TOK_A)) as old:
            await old.initialize()
            del env["EXAI_SESSION_SIGNING_KEY"]
            assert await d.reloader.reload("test")
            assert (await old.post(old.message("ping"))).status_code == 200  # (kept)
            status = d.status()
            assert "session_signing_key" in status["config"]["not_applied_until_restart"]
            assert status["doors"]["session_signing_key"] == "configured"
            env["EXAI_SESSION_SIGNING_KEY"] = "k" * 40  # (back as it was: nothing waits)
            assert await d.reloader.reload("test")
            assert "session_signing_key" not in d.status()["config"]["not_applied_until_restart"]
        d.request_shutdown()


async def test_a_key_file_first_named_by_a_reload_is_watched(tmp_path):
    """The watched files were the ones named at start: a signing key moved into
    EXAI_SESSION_SIGNING_KEY_FILE (or a tokens file newly named) by a reload was read then, but
    its next rotation went unseen until a SIGHUP."""
    key_file = tmp_path / "signing.key"
    key_file.write_text("n" * 40 + "\n")
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file), "EXAI_SESSION_SIGNING_KEY": "k" * 40}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        del env["EXAI_SESSION_SIGNING_KEY"]
        env["EXAI_SESSION_SIGNING_KEY_FILE"] = str(key_file)
        assert await d.reloader.reload("test")
        assert d.settings.session_signing_key.reveal() == "n" * 40
        tmp = key_file.with_suffix(".tmp")
        tmp.write_text("m" * 40 + "\n")
        tmp.replace(key_file)
        with trio.fail_after(HANG_GUARD_S):
            while d.settings.session_signing_key.reveal() != "m" * 40:
                await trio.sleep(0.02)
        d.request_shutdown()


async def test_a_reload_names_every_changed_setting_it_does_not_apply(tmp_path, caplog):
    # Before: only host, ports and TLS files were named; a changed limit (EXAI_MAX_INFLIGHT,
    # EXAI_ROUND_BUDGET_S) was silently not applied, against the module's docstring.
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file), "EXAI_SECRET_WATCH_INTERVAL_S": "0.05"}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        env["EXAI_MAX_INFLIGHT"] = "7"
        env["EXAI_ROUND_BUDGET_S"] = "0.5"
        write(tokens_file, TOK_A, TOK_B)
        with caplog.at_level("INFO", logger="exai"):
            assert await d.reloader.reload("test") is True
        d.request_shutdown()
    logged = [r for r in caplog.records if getattr(r, "event", None) == "config.reloaded"]
    assert len(logged) == 1
    ignored = logged[0].fields["not_applied_until_restart"]
    assert {"max_inflight", "round_budget_s"} <= set(ignored)
    assert not {"tokens", "providers", "source_files"} & set(ignored)
    assert d.settings.max_inflight != 7  # (not applied: it needs a restart)


async def test_a_reload_does_not_name_the_client_sides_settings(tmp_path, caplog):
    # Before: a changed EXAI_URL, EXAI_TOKEN, EXAI_TLS_CA, EXAI_CONNECT_WAIT_S or
    # EXAI_AUTOSTART* (the bridge's and exai call's, in a .env both sides read) was named as
    # needing a restart of the daemon, which never uses them.
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file), "EXAI_SECRET_WATCH_INTERVAL_S": "0.05"}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        env["EXAI_URL"] = "ws://127.0.0.1:9/mcp"
        env["EXAI_TOKEN"] = bearer(TOK_B)
        env["EXAI_TLS_CA"] = str(tmp_path / "ca.pem")
        env["EXAI_CONNECT_WAIT_S"] = "9"
        env["EXAI_AUTOSTART"] = "true"
        env["EXAI_AUTOSTART_WAIT_S"] = "9"
        env["EXAI_SLOT_WAIT_S"] = "9"  # (the daemon's: still named)
        with caplog.at_level("INFO", logger="exai"):
            assert await d.reloader.reload("test") is True
        d.request_shutdown()
    logged = [r for r in caplog.records if getattr(r, "event", None) == "config.reloaded"]
    assert len(logged) == 1
    ignored = set(logged[0].fields["not_applied_until_restart"])
    client_side = {"url", "token", "tls_ca", "connect_wait_s", "autostart", "autostart_wait_s"}
    assert "slot_wait_s" in ignored and not client_side & ignored, ignored
    # (the settings marked as the client side's are these)
    assert {f.name for f in attrs.fields(Settings) if f.metadata.get("client")} == client_side


def test_each_watched_file_is_watched_once() -> None:
    """``EXAI_ENV_FILE`` ends in ``_FILE``: it was watched as a secret file and again as the
    env file, and an edit of it was reported as ``file changed: /x/.env, /x/.env``."""
    env = {
        "EXAI_ENV_FILE": "/x/.env",
        "EXAI_CONFIG": "/x/exai.toml",
        "EXAI_TOKENS_FILE": "/x/tokens",
        "KIMI_API_KEY_FILE": "/x/tokens",
        "OTHER_FILE": "/x/other",
    }
    assert watched_files(env) == [Path("/x/.env"), Path("/x/tokens"), Path("/x/exai.toml")]


async def test_a_reload_of_a_large_tokens_file_leaves_the_loop_free(tmp_path):
    # The tokens were parsed on the loop, and their names checked for duplicates with
    # names.count(name) for each: a file of 200,000 entries, loaded by SIGHUP, held the
    # loop for hours (found by an attack on a live daemon: /healthz unanswered). 20,000
    # entries were a step of seconds; the stall check (tests/stall_plugin.py, 0.1 s) fails
    # the test on the old code.
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file)}
    many = [f"n{i}:tok-{i:032d}" for i in range(20_000)]
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        write(tokens_file, TOK_A, *many)
        with trio.fail_after(HANG_GUARD_S):
            while d.reloader.reloads == 0:
                await trio.sleep(0.02)
        assert len(d.reloader.tokens.identities) == 20_001
        async with ws(d, token=bearer(many[-1])) as conn:
            reply = await Rpc(conn).request(
                "initialize",
                {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}},
            )
            assert "result" in reply
        nursery.cancel_scope.cancel()


def test_a_name_used_twice_among_many_tokens_is_refused() -> None:
    from exai.config import Secret
    from exai.errors import ConfigError
    from exai.server.auth import parse_tokens

    many = [f"n{i}:tok-{i:032d}" for i in range(20_000)]
    assert len(parse_tokens(Secret("\n".join(many)))) == 20_000
    with pytest.raises(ConfigError, match="'n7' is used twice"):
        parse_tokens(Secret("\n".join([*many, "n7:tok-another-000000000000000000000"])))


async def test_a_tokens_file_made_a_fifo_fails_its_reload_and_the_next_one_applies(tmp_path):
    # The reload read the FIFO in its thread and blocked there for good, holding the lock
    # every later reload (SIGHUP or watcher) waits for: the daemon served on with the tokens
    # it had and never rotated nor revoked one again (found by an attack on a live daemon).
    import os

    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A)
    env = {"EXAI_TOKENS_FILE": str(tokens_file)}
    async with trio.open_nursery() as nursery:
        d = await start(nursery, tmp_path, env)
        tokens_file.unlink()
        os.mkfifo(tokens_file)
        try:
            with trio.fail_after(HANG_GUARD_S):
                while d.reloader.failures == 0:
                    await trio.sleep(0.02)
        finally:
            try:  # (release the old code's reader, blocked on the FIFO)
                os.close(os.open(tokens_file, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        tokens_file.unlink()
        write(tokens_file, TOK_A, TOK_B)
        with trio.fail_after(HANG_GUARD_S):
            while d.reloader.reloads == 0:
                await trio.sleep(0.02)
        async with ws(d, token=bearer(TOK_B)):
            pass
        nursery.cancel_scope.cancel()


async def test_a_tokens_file_still_being_written_is_read_once_it_stays_the_same(
    tmp_path, monkeypatch
):
    # The watcher applied a tokens file as it stood at the look that saw it change: caught
    # half-written (an editor saving in place; a large file written in parts — an attack on a
    # live daemon saw 115,764 of 200,001 tokens applied), the tokens not written yet were
    # gone and their sessions revoked (4001). Each look here waits for the test's permit.
    from exai.server import reload as reload_module

    real = reload_module._fingerprints
    entered, permit = threading.Semaphore(0), threading.Semaphore(0)

    def look(paths: list[Path]) -> Any:
        entered.release()
        permit.acquire(timeout=HANG_GUARD_S)
        return real(paths)

    async def next_look() -> None:
        """Wait until the watcher is at its next look (it has acted on the one before)."""
        with trio.fail_after(HANG_GUARD_S):
            while not entered.acquire(blocking=False):
                await trio.sleep(0.01)

    async def one_look() -> None:
        """Let one look run, and wait until the watcher has acted on it."""
        permit.release()
        await next_look()

    monkeypatch.setattr(reload_module, "_fingerprints", look)
    tokens_file = tmp_path / "tokens"
    write(tokens_file, TOK_A, TOK_B)
    async with trio.open_nursery() as nursery:
        permit.release()  # the first look, taken before the daemon is ready
        d = await start(nursery, tmp_path, {"EXAI_TOKENS_FILE": str(tokens_file)})
        await next_look()  # (the first look's entry)
        await next_look()  # the watcher waits at its second look
        async with ws(d, token=bearer(TOK_B)) as sb:
            rpc = Rpc(sb)
            # written in place, in two parts, each seen by a look: carol added at the end
            tokens_file.write_text(TOK_A + "\n")
            await one_look()
            with tokens_file.open("a") as fh:
                fh.write(TOK_B + "\n" + TOK_C + "\n")
            await one_look()
            assert d.reloader.reloads == 0  # (still changing at the last look)
            await one_look()  # the same as the last: read now
            assert d.reloader.reloads == 1
            assert len(d.reloader.tokens.identities) == 3
            with trio.fail_after(HANG_GUARD_S):
                reply = await rpc.request(
                    "initialize",
                    {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {}},
                )
            assert "result" in reply  # bob's session was never revoked
        permit.release()
        d.request_shutdown()


async def test_a_watched_file_that_never_stops_changing_does_not_hold_off_a_revocation(
    tmp_path, monkeypatch
):
    # The watcher read a change only once every watched file stayed the same for one look: a
    # key file rewritten before every look (a credential refresher) held off, for ever, the
    # reload of the tokens file — a removed token went on authenticating, its session open
    # (found by an attack on a live daemon: bob's session still open 10 s after his removal,
    # with a key file rewritten every 0.3 s). Each look here waits for the test's permit.
    from exai.server import reload as reload_module

    real = reload_module._fingerprints
    entered, permit = threading.Semaphore(0), threading.Semaphore(0)

    def look(paths: list[Path]) -> Any:
        entered.release()
        permit.acquire(timeout=HANG_GUARD_S)
        return real(paths)

    async def next_look() -> None:
        with trio.fail_after(HANG_GUARD_S):
            while not entered.acquire(blocking=False):
                await trio.sleep(0.01)

    monkeypatch.setattr(reload_module, "_fingerprints", look)
    tokens_file = tmp_path / "tokens"
    key_file = tmp_path / "key"
    write(tokens_file, TOK_A, TOK_B)
    key_file.write_text("k" * 40 + "\n")
    env = {"EXAI_TOKENS_FILE": str(tokens_file), "EXAI_SESSION_SIGNING_KEY_FILE": str(key_file)}
    async with trio.open_nursery() as nursery:
        permit.release()  # the first look, taken before the daemon is ready
        d = await start(nursery, tmp_path, env)
        await next_look()  # (the first look's entry)
        await next_look()  # the watcher waits at its second look
        async with ws(d, token=bearer(TOK_B)) as sb:
            write(tokens_file, TOK_A)  # bob removed, once
            looks = 0
            while d.reloader.reloads == 0 and looks < 20:
                # the key file rewritten (same content, a new inode) before every look
                write(key_file, "k" * 40)
                permit.release()
                await next_look()
                looks += 1
            assert d.reloader.reloads == 1, "the revocation waited for the key file to settle"
            assert looks == reload_module.SETTLE_MAX_LOOKS + 1
            assert [i.name for i in d.reloader.tokens.identities] == ["alice"]
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(HANG_GUARD_S):
                while True:
                    await sb.get_message()
            assert info.value.reason.code == 4001
        permit.release()
        d.request_shutdown()
