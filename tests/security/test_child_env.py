"""Child processes (git, hooks, formatters) get an environment without exai's secrets."""

from __future__ import annotations

import subprocess
import sys

from exai.config import Settings
from exai.config.hygiene import child_env, secret_values, token_entries

AMBIENT = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/u",
    "LANG": "C.UTF-8",
    "GIT_AUTHOR_NAME": "someone",
}

SECRET_NAMES = {
    "KIMI_API_KEY": "sk-kimi-child-secret-0001",
    "KIMI_API_KEY_FILE": "/run/secrets/kimi",
    "KIMI_BASE_URL": "https://api.moonshot.ai/v1",
    "GLM_API_KEY": "sk-glm-child-secret-0002",
    "EXAI_TOKENS": "alice:tok-child-secret-0003",
    "EXAI_TOKENS_FILE": "/run/secrets/tokens",
    "EXAI_TOKEN": "tok-child-secret-0003",
    "EXAI_TOKEN_FILE": "/run/secrets/token",
    "EXAI_PROVIDER_LOCAL_API_KEY": "sk-local-child-secret-0004",
    "EXAI_PROVIDER_LOCAL_API_KEY_FILE": "/run/secrets/local",
    "EXAI_STORAGE_URL": "postgresql://postgres:pw-child-secret-0005@db/exai",
    "EXAI_REDIS_URL_FILE": "/run/secrets/redis",
    "OPENAI_API_KEY": "sk-openai-child-secret-0006",
}


def test_child_env_drops_every_secret_variable_by_name():
    env = child_env({**AMBIENT, **SECRET_NAMES})
    assert env == AMBIENT


def test_child_env_keeps_harmless_exai_settings():
    env = child_env({**AMBIENT, "EXAI_PORT": "8079", "EXAI_LOG_LEVEL": "debug"})
    assert env["EXAI_PORT"] == "8079" and env["EXAI_LOG_LEVEL"] == "debug"


def test_child_env_drops_variables_whose_value_is_a_configured_secret():
    settings = Settings.from_env(
        {
            "EXAI_TOKENS": "alice:tok-value-secret-0007,tok-anon-secret-0008",
            "KIMI_API_KEY": "sk-kimi-value-secret-0009",
            "EXAI_STORAGE_URL": "postgresql://postgres:pw-value-secret-0010@db/exai",
        },
        env_file="",
        config_file="",
    )
    environ = {
        **AMBIENT,
        "MY_TOKEN": "tok-value-secret-0007",  # one token of the list, under another name
        "ALSO_TOKEN": "tok-anon-secret-0008",
        "DEPLOY_KEY": "sk-kimi-value-secret-0009",
        "PGPASSWORD": "pw-value-secret-0010",  # the password inside the storage URL
        "DATABASE_URL": "postgresql://postgres:pw-value-secret-0010@db/exai",
        "CURL_HEADER": "Authorization: Bearer sk-kimi-value-secret-0009",  # contains one
    }
    assert child_env(environ, settings=settings) == AMBIENT


def test_child_env_reads_os_environ_by_default_and_never_changes_it(monkeypatch):
    monkeypatch.setenv("KIMI_API_KEY", "sk-kimi-default-secret-0011")
    monkeypatch.setenv("EXAI_CHILD_ENV_PROBE", "kept")
    env = child_env()
    assert "KIMI_API_KEY" not in env
    assert env["EXAI_CHILD_ENV_PROBE"] == "kept"
    import os

    assert os.environ["KIMI_API_KEY"] == "sk-kimi-default-secret-0011"


def test_a_child_process_started_with_child_env_sees_no_secret():
    environ = {**AMBIENT, **SECRET_NAMES, "PATH": __import__("os").environ["PATH"]}
    out = subprocess.run(
        [sys.executable, "-c", "import os, json; print(json.dumps(dict(os.environ)))"],
        env=child_env(environ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for value in SECRET_NAMES.values():
        if "secret" in value:
            assert value not in out


def test_secret_values_lists_each_token_key_and_url_password():
    settings = Settings.from_env(
        {
            "EXAI_TOKENS": "alice:tok-list-secret-0012,sha256:" + "ab" * 32,
            "EXAI_REDIS_URL": "redis://:redis-pass-secret-0013@127.0.0.1:6379/0",
        },
        env_file="",
        config_file="",
    )
    values = secret_values(settings)
    assert "tok-list-secret-0012" in values
    assert "redis-pass-secret-0013" in values
    assert "ab" * 32 not in values  # a stored hash is not a usable secret


def test_token_entries_describe_tokens_without_their_values():
    settings = Settings.from_env(
        {"EXAI_TOKENS": "alice:short,sha256:" + "cd" * 32 + "," + "t" * 41},
        env_file="",
        config_file="",
    )
    entries = token_entries(settings.tokens)
    assert [(e.name, e.hashed, e.length) for e in entries] == [
        ("alice", False, 5),
        ("client-2", True, None),
        ("client-3", False, 41),
    ]
    assert "short" not in repr(entries)
