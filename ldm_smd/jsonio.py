"""JSON results files: one helper for every report the package and its scripts write.

:func:`to_json` makes strict JSON out of results: NaN and infinities become ``null`` (so the file
parses everywhere), numpy and torch scalars and arrays become numbers and lists, paths and other
objects their ``str``. :func:`write_json` writes atomically
(:func:`ldm_smd.fileio.atomic_write`), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_smd.fileio import atomic_write


def to_json(value: Any) -> Any:
    """``value`` as plain JSON data (recursively; non-finite floats become ``None``)."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def dumps(value: Any, *, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (see :func:`to_json`)."""
    return json.dumps(to_json(value), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON to ``path`` (to a temporary name, then renamed)."""
    text = dumps(value, indent=indent) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))
