"""Helpers the notebooks call: find the project, log, load a stage's config, record metrics a test can read.

    python -c "from prodtune.notebook import read_records; print(read_records('outputs/cpu', '01'))"

Every notebook starts with `stage = notebook.setup("01", PROFILE, RECIPE)` and ends with `notebook.record(name, value)`
calls (like recommenders' `store_metadata`): each stage's records go to one place,
`<outputs_dir>/records/<stage>.json` (`01s.json` for notebook 01 run with the study recipe); papermill tests and the
pipeline read them back with `read_records`.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from prodtune.io import project_root, read_json, setup_logging, write_json

T = TypeVar("T")


@dataclass
class Stage:
    """What a notebook run is: its stage key, profile, recipe and overrides, and where its records go."""

    key: str
    profile: str
    recipe: str | None
    overrides: list[str]
    records: Path

    def config(self, cls: type[T], track: str | None = None, **values: Any) -> T:
        """The stage's dataclass through the one loader: profile, recipe, OVERRIDES, then the notebook's values."""
        from prodtune.config import load_config

        return load_config(cls, self.profile, self.overrides, recipe=self.recipe, track=track, **values)


_CURRENT: Stage | None = None


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def setup(key: str, profile: str = "cpu", recipe: str | None = None, overrides: Sequence[str] = ()) -> Stage:
    """Chdir to the project root (so the profile's relative paths work from any notebook), log, print versions.

    Args:
        key: the stage (`01`..`06`); with a recipe the records are `<key><recipe initial>` (`01s` for study).
        profile: profile name or YAML path.
        recipe: a recipe of the profile (`study`) or None.
        overrides: `section.key=value` strings.
    """
    global _CURRENT
    from prodtune.config import load_profile, paths_of

    root = project_root()
    os.chdir(root)
    setup_logging()
    import torch
    import transformers

    prof = load_profile(profile, overrides)
    stage_key = key + (recipe[0] if recipe else "")
    records = root / paths_of(prof)["outputs_dir"] / "records" / f"{stage_key}.json"
    _CURRENT = Stage(stage_key, profile, recipe, list(overrides), records)
    print(
        f"prodtune at {root} | stage {stage_key} | profile {prof['profile']}{' | recipe ' + recipe if recipe else ''} "
        f"| python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} "
        f"| cuda {torch.cuda.is_available()}"
    )
    return _CURRENT


def record(name: str, value: Any) -> Any:
    """Record a metric of the current stage into `<outputs_dir>/records/<stage>.json` and return it."""
    if _CURRENT is None:
        raise RuntimeError("call notebook.setup(...) before notebook.record(...)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric {name} is not finite: {value}")
    data = read_json(_CURRENT.records) if _CURRENT.records.is_file() else {}
    data[name] = value
    write_json(_CURRENT.records, data)
    return value


def read_records(outputs_dir: str | os.PathLike, stage: str) -> dict[str, Any]:
    """Read back what `record` wrote for a stage (`01`, `03s`...) under a profile's outputs folder."""
    path = Path(outputs_dir) / "records" / f"{stage}.json"
    return read_json(path) if path.is_file() else {}
