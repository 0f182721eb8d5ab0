"""Result, config and plot files: written atomically (a reader never sees half a file, a crash never
leaves one), with configs turned into plain YAML/JSON-friendly values first."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` (text, or bytes) to `path` through a temporary file in its folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, record: Any, indent: int = 2) -> None:
    """`record` as indented JSON, written atomically."""
    write_atomically(path, json.dumps(record, indent=indent) + "\n")


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG, written atomically; the figure is closed (pyplot keeps none open)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())
    return Path(path)


def plain(value: Any) -> Any:
    """`value` with paths as strings and tuples as lists, recursively (for YAML and JSON dumps of configs)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
