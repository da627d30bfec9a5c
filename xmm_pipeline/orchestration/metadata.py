"""Metadata helpers: figures and tables as the Dagster UI shows them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import MetadataValue


def figure_markdown(figure: Any, title: str) -> MetadataValue:
    """A matplotlib figure as an inline PNG in a Markdown metadata entry (the UI renders it)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def png_markdown(path: Path, title: str) -> MetadataValue:
    """An existing PNG file inline in Markdown, so latent maps show in the asset's page."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def table_markdown(frame: pd.DataFrame, max_rows: int = 20) -> MetadataValue:
    return MetadataValue.md(frame.head(max_rows).to_markdown(index=False))


def counts_markdown(counts: dict[str, int], key: str = "reason", value: str = "count") -> MetadataValue:
    lines = [f"| {key} | {value} |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    return MetadataValue.md("\n".join(lines))


def path_value(path: Path) -> MetadataValue:
    return MetadataValue.path(str(path))
