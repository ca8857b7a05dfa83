"""Settings: sources, precedence, secrets, unknown names."""

from __future__ import annotations

import pytest

from exai.config import Secret, Settings, known_env_names
from exai.errors import ConfigError
from exai.server.auth import TokenTable, parse_tokens


def load(env: dict[str, str], **kw: object) -> Settings:
    kw.setdefault("env_file", "")
    return Settings.from_env(env, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"EXAI_PORT": "9123"}, "ws://127.0.0.1:9123/mcp"),
        ({"EXAI_HOST": "0.0.0.0", "EXAI_PORT": "9123"}, "ws://127.0.0.1:9123/mcp"),
        ({"EXAI_HOST": "::", "EXAI_PORT": "9123"}, "ws://[::1]:9123/mcp"),
        ({"EXAI_HOST": "::1"}, "ws://[::1]:8079/mcp"),
        ({"EXAI_HOST": "10.1.2.3", "EXAI_PORT": "9123"}, "ws://10.1.2.3:9123/mcp"),
        ({"EXAI_TLS_CERT": "c.pem", "EXAI_TLS_KEY": "k.pem"}, "wss://127.0.0.1:8079/mcp"),
        ({"EXAI_PORT": "9123", "EXAI_URL": "ws://127.0.0.1:7000/mcp"}, "ws://127.0.0.1:7000/mcp"),
    ],
)
def test_the_client_url_is_derived_from_host_and_port_unless_exai_url_is_set(env, url):
    assert load(env).effective_url == url


def test_defaults_match_the_documented_names():
    s = load({})
    assert (s.host, s.port, s.admin_port) == ("127.0.0.1", 8079, 8080)
    assert s.url == "" and s.effective_url == "ws://127.0.0.1:8079/mcp"
    assert s.tokens is None
    for name in (
        "EXAI_HOST",
        "EXAI_PORT",
        "EXAI_ADMIN_PORT",
        "EXAI_TOKENS",
        "EXAI_TOKENS_FILE",
        "EXAI_MAX_CONNECTIONS",
        "EXAI_MAX_CONNECTIONS_PER_IP",
        "EXAI_MAX_FRAME_BYTES",
        "EXAI_SESSION_MAX_INFLIGHT",
        "EXAI_MAX_INFLIGHT",
        "EXAI_CALL_TIMEOUT_S",
        "EXAI_URL",
        "EXAI_TOKEN",
    ):
        assert name in known_env_names()


def test_environment_values_are_converted():
    s = load({"EXAI_PORT": "0", "EXAI_CALL_TIMEOUT_S": "2.5", "EXAI_ALLOW_INSECURE_BIND": "yes"})
    assert s.port == 0 and s.call_timeout_s == 2.5 and s.allow_insecure_bind is True


def test_unknown_exai_variable_is_an_error_naming_the_closest_valid_one():
    with pytest.raises(ConfigError) as info:
        load({"EXAI_MAX_CONECTIONS": "5"})
    assert "EXAI_MAX_CONECTIONS" in str(info.value)
    assert "EXAI_MAX_CONNECTIONS" in str(info.value).split("did you mean")[1]


def test_a_wrongly_typed_value_names_the_variable_not_the_value():
    with pytest.raises(ConfigError) as info:
        load({"EXAI_PORT": "eighty"})
    assert "EXAI_PORT" in str(info.value)
    assert "eighty" not in str(info.value)


def test_secret_from_a_file_is_read_and_never_put_in_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "kimi.key"
    f.write_text("sk-file-secret-value\n")
    env = {"KIMI_API_KEY_FILE": str(f)}
    s = load(env)
    key = s.provider("kimi").api_key
    assert key is not None and key.reveal() == "sk-file-secret-value"
    assert "KIMI_API_KEY" not in env
    import os

    assert "sk-file-secret-value" not in "".join(os.environ.values())


def test_unreadable_secret_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load({"EXAI_TOKENS_FILE": str(tmp_path / "missing")})
    assert "EXAI_TOKENS_FILE" in str(info.value)


def test_secret_never_shows_its_value():
    s = Secret("hunter2-very-secret")
    for text in (repr(s), str(s), f"{s}", s.redacted(), repr([s])):
        assert "hunter2" not in text
    assert Secret("postgresql://u:pw-secret@h:5432/db").redacted() == "postgresql://u:***@h:5432/db"
    assert len(s.fingerprint()) == 8


def test_display_redacts_every_secret():
    s = load(
        {
            "EXAI_TOKENS": "alice:tok-abcdefgh",
            "KIMI_API_KEY": "sk-kimi-123456",
            "EXAI_STORAGE_URL": "postgresql://exai:db-password-1@localhost/exai",
            "EXAI_PROVIDER_LOCAL_BASE_URL": "http://127.0.0.1:9000/v1",
            "EXAI_PROVIDER_LOCAL_API_KEY": "sk-local-999",
        }
    )
    text = repr(s.display())
    for secret in ("tok-abcdefgh", "sk-kimi-123456", "db-password-1", "sk-local-999"):
        assert secret not in text
    assert "local" in s.display()["providers"]


def test_toml_file_and_env_file_precedence(tmp_path):
    toml = tmp_path / "exai.toml"
    toml.write_text('port = 9001\nmax_inflight = 7\n[providers.vllm]\nbase_url = "http://h/v1"\n')
    envf = tmp_path / ".env"
    envf.write_text("EXAI_PORT=9002\n")
    s = Settings.from_env({"EXAI_CONFIG": str(toml), "EXAI_ENV_FILE": str(envf)})
    assert s.max_inflight == 7  # from TOML
    assert s.port == 9002  # .env beats TOML
    s2 = Settings.from_env(
        {"EXAI_CONFIG": str(toml), "EXAI_ENV_FILE": str(envf), "EXAI_PORT": "9003"}
    )
    assert s2.port == 9003  # the environment beats both
    assert s.provider("vllm") is not None


def test_unknown_toml_key_is_an_error(tmp_path):
    toml = tmp_path / "exai.toml"
    toml.write_text("max_inflite = 3\n")
    with pytest.raises(ConfigError, match="max_inflight"):
        Settings.from_env({"EXAI_CONFIG": str(toml)}, env_file="")


def test_extra_provider_from_environment_with_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="EXAI_PROVIDER_X_BASEURL"):
        load({"EXAI_PROVIDER_X_BASEURL": "http://h"})


def test_token_entries_plain_named_and_hashed():
    import hashlib

    digest = hashlib.sha256(b"tok-hashed").hexdigest()
    table = TokenTable(parse_tokens(Secret(f"tok-plain,bob:tok-bob\ncarol:sha256:{digest}")))
    assert table.authenticate("Bearer tok-plain").name == "client-1"
    assert table.authenticate("Bearer tok-bob").name == "bob"
    assert table.authenticate("Bearer tok-hashed").name == "carol"
    assert table.authenticate("Bearer nope") is None
    assert table.authenticate(None) is None
    assert table.authenticate("Basic tok-plain") is None


def test_a_token_is_found_in_one_lookup_however_many_tokens_there_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each connection attempt, authenticated or not, compared the presented digest with every
    # stored one: with 200,000 tokens ≈ 110 ms of one loop step per attempt (found by an attack
    # on a live daemon: loop.stall in authenticate). Here: how many stored digests are touched.
    import hmac

    from exai.server import auth

    identities = tuple(auth.Identity(f"c{i}", auth._digest(f"tok-{i}")) for i in range(20_000))
    table = TokenTable(identities)
    compared = 0
    real = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        nonlocal compared
        compared += 1
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    found = table.authenticate("Bearer tok-12345")
    assert found is not None and found.name == "c12345"
    assert table.authenticate("Bearer tok-none") is None
    assert table.authenticate("Bearer tok-0").name == "c0"
    assert compared <= 3, f"{compared} stored digests compared for 3 attempts"


def test_a_token_given_twice_authenticates_as_its_last_entry() -> None:
    # (a scan kept the last entry that matched; the lookup does the same)
    table = TokenTable(parse_tokens(Secret("ann:same-token,bob:same-token")))
    assert table.authenticate("Bearer same-token").name == "bob"


def test_malformed_token_entry_is_reported_without_its_value():
    with pytest.raises(ConfigError) as info:
        parse_tokens(Secret("sha256:nothex-secretish"))
    assert "nothex-secretish" not in str(info.value)


def test_no_tokens_means_anonymous_access():
    assert TokenTable(()).authenticate(None).name == "anonymous"


@pytest.mark.parametrize(
    "env",
    [
        {"EXAI_IDEMPOTENCY_TTL_S": "nan"},
        {"EXAI_ROUND_BUDGET_S": "NaN"},
        {"EXAI_PROVIDER_X_BASE_URL": "http://127.0.0.1:1/v1", "EXAI_PROVIDER_X_RPM": "nan"},
    ],
)
def test_a_float_setting_that_is_not_a_number_is_refused(env):
    # Before: float("nan") was taken, and a NaN passes every range check (each comparison
    # says false), so a daemon started with it (helper report, attack on part 12).
    with pytest.raises(ConfigError, match="invalid value"):
        Settings.from_env(env, env_file="", config_file="")


def _release(fifo) -> None:
    """Give a reader blocked on ``fifo`` (the old code's) its end of file."""
    import os

    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # (nobody reads it)


@pytest.mark.parametrize("var", ["EXAI_TOKENS_FILE", "KIMI_API_KEY_FILE", "EXAI_CONFIG"])
def test_a_fifo_for_a_secret_or_settings_file_is_refused_unread(tmp_path, var):
    # Reading a FIFO blocked for good: a SIGHUP's reload then held every later reload (found
    # by an attack on a live daemon), a start never ended. A device (/dev/zero) was read until
    # memory ran out. What is not a regular file is refused without being read.
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | Settings] = []

    def run() -> None:
        try:
            outcome.append(load({var: str(fifo)}))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)  # (a hang guard only)
    try:
        assert not t.is_alive(), "reading the FIFO blocked"
    finally:
        _release(fifo)
    assert isinstance(outcome[0], ConfigError), outcome
    assert var in str(outcome[0]) or str(fifo) in str(outcome[0])
    assert "not a regular file" in str(outcome[0])


def test_a_device_for_a_secret_file_is_refused_unread(tmp_path):
    link = tmp_path / "key"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"KIMI_API_KEY_FILE: cannot read secret file .*: not a"):
        load({"KIMI_API_KEY_FILE": str(link)})
