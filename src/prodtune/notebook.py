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

from prodtune.io import headless, project_root, read_json, setup_logging, write_json

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

    if headless():
        # `prodtune run` streams each cell's text to the terminal: plain tqdm bars (text), not widgets nobody sees
        import tqdm.auto
        import tqdm.std

        tqdm.auto.tqdm = tqdm.std.tqdm
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


def static_png(fig: Any, width_in: float = 8.0, height_in: float = 4.5) -> bytes:
    """A static PNG of a plotly figure drawn with matplotlib (scatter/line, bar, histogram and funnel traces).

    Executed notebooks keep it beside the interactive figure, so they read on GitHub, in nbconvert and in any
    viewer without JavaScript; no browser or kaleido is needed.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    f, ax = plt.subplots(figsize=(width_in, height_in))
    bars = [t for t in fig.data if t.type == "bar"]
    width = 0.8 / max(1, len(bars))
    for t in fig.data:
        name = t.name or None
        if t.type == "scatter":
            mode = t.mode or "lines"
            ax.plot(list(t.x), list(t.y), label=name, marker="o" if "markers" in mode else None,
                    linestyle="-" if "lines" in mode else "none", markersize=3)
        elif t.type == "bar":
            i = bars.index(t)
            horizontal = t.orientation == "h"
            cats = list(t.y if horizontal else t.x)
            vals = list(t.x if horizontal else t.y)
            pos = np.arange(len(cats)) + (i - (len(bars) - 1) / 2) * width
            (ax.barh if horizontal else ax.bar)(pos, vals, width, label=name)
            (ax.set_yticks if horizontal else ax.set_xticks)(np.arange(len(cats)), [str(c) for c in cats])
        elif t.type == "histogram":
            ax.hist([v for v in t.x if v is not None], bins=getattr(t, "nbinsx", None) or 50, alpha=0.6, label=name,
                    log=getattr(fig.layout.yaxis, "type", None) == "log")
        elif t.type == "funnel":
            ax.barh(list(t.y)[::-1], list(t.x)[::-1], label=name)
            for y, x in zip(list(t.y)[::-1], list(t.x)[::-1]):
                ax.text(x, y, f" {x:,}", va="center", fontsize=8)
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else ""
    ax.set_title(title)
    ax.set_xlabel(fig.layout.xaxis.title.text or "" if fig.layout.xaxis and fig.layout.xaxis.title else "")
    ax.set_ylabel(fig.layout.yaxis.title.text or "" if fig.layout.yaxis and fig.layout.yaxis.title else "")
    if any(t.name for t in fig.data) and len(fig.data) > 1:
        ax.legend(fontsize=8)
    f.tight_layout()
    buf = io.BytesIO()
    f.savefig(buf, format="png", dpi=100)
    plt.close(f)
    return buf.getvalue()


def show(fig: Any) -> None:
    """Show a plotly figure interactively and, beside it, a static PNG of it (see `static_png`)."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover, plain Python without IPython
        fig.show()
        return
    if get_ipython() is None:
        fig.show()
        return
    fig.show()
    display(Image(static_png(fig)))
