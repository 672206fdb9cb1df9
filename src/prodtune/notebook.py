"""Helpers the notebooks call: find the project, pick a profile, log, load a stage's config, record metrics.

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

from prodtune.io import headless, home_dir, project_root, read_json, setup_logging, write_json

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


SMALL_CARD_GIB = 14.0  # colab-t4 needs a T4's 15 GB (torch reports 14.7 GiB); smaller cards get the 8 GB profile
LARGE_CARD_GIB = 70.0  # the h100 profile's batches and 4k rows are sized for 80 GB cards (H100, A100 80 GB, H200)


def pick_profile(device_name: str | None, capability: tuple[int, int] | None = None,
                 total_gib: float | None = None) -> tuple[str, str]:
    """The profile for a GPU, and why: what `PROFILE = None` means in a notebook.

    Args:
        device_name: `torch.cuda.get_device_name()`, or None where there is no CUDA device.
        capability: (major, minor) compute capability; bf16 needs 8.0+ (Ampere).
        total_gib: the card's memory in GiB.

    Returns:
        (profile, reason): `cpu` without CUDA; `rtx4060-8gb` under 14 GiB; `h100` from 70 GiB with bf16;
        `colab-t4` (fp16, 4-bit) for a T4 and every other card.
    """
    if not device_name:
        return "cpu", "no CUDA GPU is visible"
    card = ", ".join([device_name] + ([f"{total_gib:.1f} GiB"] if total_gib is not None else [])
                     + ([f"compute capability {capability[0]}.{capability[1]}"] if capability else []))
    bf16 = capability is not None and capability >= (8, 0)
    if "T4" in device_name.upper().split():
        return "colab-t4", f"{card}: the T4 profile"
    if total_gib is not None and total_gib < SMALL_CARD_GIB:
        why = f"{card}: under {SMALL_CARD_GIB:g} GiB, the 8 GB profile"
        if not bf16:
            why += " (it trains in bf16, which this card lacks: OVERRIDES = ['train.bf16=false', 'train.fp16=true'])"
        return "rtx4060-8gb", why
    if total_gib is not None and total_gib >= LARGE_CARD_GIB and bf16:
        return "h100", f"{card}: {LARGE_CARD_GIB:g} GiB or more with bf16, the H100 profile"
    return "colab-t4", f"{card}: the T4 profile (fp16, 4-bit) fits a card of this size"


def detect_profile() -> tuple[str, str]:
    """`pick_profile` for this machine's first CUDA device (torch.cuda), or `cpu`."""
    import torch

    if not torch.cuda.is_available():
        return pick_profile(None)
    props = torch.cuda.get_device_properties(0)
    return pick_profile(props.name, (props.major, props.minor), props.total_memory / 2**30)


def setup(key: str, profile: str | None = "cpu", recipe: str | None = None, overrides: Sequence[str] = ()) -> Stage:
    """Chdir to the project root (so the profile's relative paths work from any notebook), log, print versions.

    Args:
        key: the stage (`01`..`06`); with a recipe the records are `<key><recipe initial>` (`01s` for study).
        profile: profile name or YAML path; None picks one from the GPU (`detect_profile`) and says why.
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

    if profile is None:
        profile, why = detect_profile()
        print(f"PROFILE = None: using profile {profile!r} ({why}); name one in the parameters cell to choose")

    if headless():
        # `prodtune run` streams each cell's text to the terminal: plain tqdm bars (text), not widgets nobody sees
        import tqdm.auto
        import tqdm.std

        tqdm.auto.tqdm = tqdm.std.tqdm
    prof = load_profile(profile, overrides)
    stage_key = key + (recipe[0] if recipe else "")
    records = root / paths_of(prof)["outputs_dir"] / "records" / f"{stage_key}.json"
    _CURRENT = Stage(stage_key, profile, recipe, list(overrides), records)
    home = home_dir()  # where data/, models/ and outputs/ are, when PRODTUNE_HOME puts them outside the checkout
    print(
        f"prodtune at {root}{' | home ' + str(home) if home != root else ''} | stage {stage_key} "
        f"| profile {prof['profile']}{' | recipe ' + recipe if recipe else ''} | python {platform.python_version()} "
        f"| torch {torch.__version__} | transformers {transformers.__version__} | cuda {torch.cuda.is_available()}"
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
