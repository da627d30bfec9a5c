"""Code versions tied to the code that computes an asset, so Dagster marks it stale when that changes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any


def module_source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cannot version {module}: module not found", name=module)
    return Path(spec.origin)


def code_version(*modules: str, config: Any = None) -> str:
    """A short hash of the named modules' source text and of the configuration they run with.

    `config` may be a dataclass, a pydantic model or anything JSON-serialisable; it makes a change of
    default settings (epochs, latent dimension, selection threshold) a new code version as well.
    """
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.encode())
        digest.update(module_source_path(module).read_bytes())
    if config is not None:
        digest.update(json.dumps(_plain(config), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return value
