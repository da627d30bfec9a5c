"""Code versions tied to the code that computes an asset, so Dagster marks it stale when that changes."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def module_source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cannot version {module}: module not found", name=module)
    return Path(spec.origin)


def code_version(*modules: str) -> str:
    """A short hash of the named modules' source text (configuration defaults live in that source)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.encode())
        digest.update(module_source_path(module).read_bytes())
    return digest.hexdigest()[:16]
