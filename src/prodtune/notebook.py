"""Helpers the notebooks call: find the repo, set up logging, record metrics a test can read.

    python -c "from prodtune.notebook import read_records; print(read_records('outputs/cpu/01_prepare_data'))"

`record(name, value)` (like recommenders' `store_metadata`) keeps a number for tests and reports: it is
written to `<stage_dir>/records.json`; papermill tests read that file back.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

from prodtune.io import project_root, read_json, setup_logging, write_json

_RECORDS: dict[str, dict[str, Any]] = {}


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def setup(profile: str = "cpu") -> Path:
    """Chdir to the repo root (so relative paths in profiles work from any notebook), log, print versions."""
    root = project_root()
    os.chdir(root)
    setup_logging()
    import torch
    import transformers

    print(
        f"prodtune at {root} | profile {profile} | python {platform.python_version()} | torch {torch.__version__} "
        f"| transformers {transformers.__version__} | cuda {torch.cuda.is_available()}"
    )
    return root


def record(stage_dir: str | os.PathLike, name: str, value: Any) -> Any:
    """Record a metric of a stage into `<stage_dir>/records.json` (merged with what is there) and return it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric {name} is not finite: {value}")
    path = Path(stage_dir) / "records.json"
    data = read_json(path) if path.is_file() else {}
    data[name] = value
    write_json(path, data)
    _RECORDS.setdefault(str(stage_dir), {})[name] = value
    return value


def read_records(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """Read back what `record` wrote for a stage."""
    path = Path(stage_dir) / "records.json"
    return read_json(path) if path.is_file() else {}
