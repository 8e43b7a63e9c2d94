"""Write a benchmark's results as JSON and as a Markdown table."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    path_stem: Path,
    title: str,
    intro: str,
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    notes: str = "",
) -> None:
    """``<stem>.json`` with everything, ``<stem>.md`` with the table."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "title": title,
        "settings": dict(settings),
        "machine": machine(),
        "results": list(rows),
    }
    path_stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    settings_text = ", ".join(f"{k}={v}" for k, v in settings.items())
    body = (
        f"# {title}\n\n{intro}\n\nSettings: {settings_text}.\n\n{markdown_table(rows, columns)}\n"
    )
    if notes:
        body += f"\n{notes}\n"
    path_stem.with_suffix(".md").write_text(body)
