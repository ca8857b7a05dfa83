"""Write .env.example from the Settings class: every setting, its default, secrets empty.

Run: .venv/bin/python scripts/gen_env_example.py > .env.example
(tests/test_docs.py checks that the committed file lists every setting.)
"""

from __future__ import annotations

import sys
from pathlib import Path

# the exai beside this script, not whichever one the interpreter would import (an editable
# install of another checkout, say): the file it writes describes this tree's Settings
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs

from exai.config import (
    BUILTIN_PROVIDERS,
    PROVIDER_FIELDS,
    ProviderSettings,
    Settings,
    env_name,
)

HEADER = """\
# exai settings. Copy to .env (never commit .env) or export in the environment.
# Secrets may also come from NAME_FILE, a path to a file holding the value.
# Precedence: defaults < TOML file (EXAI_CONFIG) < .env < environment.
"""


def main() -> None:
    print(HEADER)
    print("# EXAI_CONFIG=            path of a TOML file with the same settings (lower-case names)")
    print("# EXAI_ENV_FILE=          path of this file when it is not ./.env")
    print()
    for f in attrs.fields(Settings):
        if f.metadata.get("env") == "-":
            continue
        default = f.default
        secret = "Secret" in str(f.type)
        if secret or default is None:
            value = ""
        elif isinstance(default, tuple):
            value = ",".join(default)
        elif isinstance(default, bool):
            value = "1" if default else "0"
        else:
            value = str(default)
        print(f"# {f.metadata['doc']}" + (" (secret; or *_FILE)" if secret else ""))
        print(f"{env_name(f)}={value}")
    print()
    print("# --- providers: Kimi (KIMI_*), GLM (GLM_*), and any OpenAI-compatible endpoint")
    print("# --- as EXAI_PROVIDER_<NAME>_<FIELD> (e.g. EXAI_PROVIDER_VLLM_BASE_URL)")
    defaults = {f.name: f.default for f in attrs.fields(ProviderSettings)}
    for prefix in ("KIMI", "GLM"):
        builtin = BUILTIN_PROVIDERS[prefix.lower()]
        for fld in PROVIDER_FIELDS:
            if fld in ("models", "kind", "base_url", "api_key"):
                value = ""  # empty = the built-in default
            else:
                value = str(builtin.get(fld, defaults[fld]))
            print(f"{prefix}_{fld.upper()}={value}")
        print()
    print("# EXAI_PROVIDER_MOCK_BASE_URL=http://127.0.0.1:9000/v1")
    print("# EXAI_PROVIDER_MOCK_MODELS=mock-fast,mock-pro")


if __name__ == "__main__":
    main()
