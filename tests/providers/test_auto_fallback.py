"""`auto` with none of the configured fast/quality models served uses what is served."""

from __future__ import annotations

import attrs

from exai.config import Settings
from exai.providers.provider import Provider
from exai.providers.registry import ModelRegistry
from tests.providers.conftest import provider_settings


def test_auto_uses_a_local_endpoints_models_when_no_class_model_is_served():
    base = Settings.from_env({}, env_file="", config_file="")  # Kimi/GLM lists, no keys
    local = provider_settings("local", "http://127.0.0.1:9/v1", None, ("llama-3", "qwen"))
    settings = attrs.evolve(base, providers=(*base.providers, local))
    providers = {p.name: Provider(p) for p in settings.providers}
    chain = ModelRegistry(settings, providers).resolve("auto", "chat")
    assert chain[0] == ("local", "llama-3")
    assert all(prov == "local" for prov, _ in chain)  # kimi and glm have no keys
