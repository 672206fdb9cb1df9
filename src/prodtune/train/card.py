"""What a finished run leaves beside its adapter: the run card's figures, the loss history and its plots.

    python -c "from prodtune.train import loss_figure; loss_figure('models/cpu/llama').show()"

`run_card.json` holds the settings, data hash, steps, loss histories, the Trainer's own speed metrics
(`train_runtime`, `train_samples_per_second`, ...), per-step wall times with the steady-state tokens/s derived
from them (benchmarks/bench_train_ddp.py reads those), peak memory and versions.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from prodtune.io import atomic_path, log, read_json, write_json


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Train and validation losses from `trainer.state.log_history`, one point per logged step."""
    train, evals = {}, {}
    for e in log_history:
        if "loss" in e and "step" in e:
            train[e["step"]] = {"step": e["step"], "loss": float(e["loss"]), "learning_rate": float(e.get("learning_rate", 0.0)),
                                "epoch": float(e.get("epoch", 0.0))}
        if "eval_loss" in e and "step" in e:
            evals[e["step"]] = {"step": e["step"], "loss": float(e["eval_loss"]), "epoch": float(e.get("epoch", 0.0))}
    return {"train_loss": [train[k] for k in sorted(train)], "eval_loss": [evals[k] for k in sorted(evals)]}


def save_history(out: Path, hist: dict[str, list[dict[str, float]]]) -> None:
    """`loss_history.json` and `loss_history.csv` (one row per logged point, split train/validation)."""
    import pandas as pd

    write_json(out / "loss_history.json", hist)
    rows = [{"split": "train", **p} for p in hist["train_loss"]] + [{"split": "validation", **p} for p in hist["eval_loss"]]
    with atomic_path(out / "loss_history.csv") as tmp:
        pd.DataFrame(rows, columns=["split", "step", "loss", "learning_rate", "epoch"]).to_csv(tmp, index=False)


def loss_figure(run: str | os.PathLike | dict[str, Any]) -> Any:
    """Interactive plotly figure of train and validation loss vs step, from a run folder or run card."""
    import plotly.graph_objects as go

    card = run if isinstance(run, dict) else read_json(Path(run) / "run_card.json")
    fig = go.Figure()
    for key, name, dash in (("train_loss", "train", "solid"), ("eval_loss", "validation", "dash")):
        pts = card.get(key) or []
        fig.add_trace(go.Scatter(x=[p["step"] for p in pts], y=[p["loss"] for p in pts], mode="lines+markers",
                                 name=name, line={"dash": dash}))
    fig.update_layout(title=f"{card.get('track', '')} track: loss vs step ({card.get('base_model', '')})",
                      xaxis_title="optimizer step", yaxis_title="cross-entropy loss", template="plotly_white")
    return fig


def save_loss_plots(out: Path, card: dict[str, Any]) -> None:
    """`loss.html` (plotly, self-contained: works offline) and `loss.png` (matplotlib: kaleido needs Chrome)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fig_html = loss_figure(card)
    except ImportError as e:  # plotly is in requirements.txt; a bare GPU image may lack it: keep the PNG
        log.warning("loss.html not written (%s); loss.png and loss_history.csv are", e)
    else:
        with atomic_path(out / "loss.html", ".html") as tmp:
            fig_html.write_html(tmp, include_plotlyjs=True, full_html=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, name, style in (("train_loss", "train", "-"), ("eval_loss", "validation", "--")):
        pts = card.get(key) or []
        if pts:
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], style, marker="o", ms=3, label=name)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title=f"{card.get('track')} track loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png", ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def step_timer() -> Any:
    """A Trainer callback recording each optimizer step's wall time (CUDA-synchronised) in `.times`.

    The Trainer reports whole-session figures only (`train_runtime` includes warm-up, evaluation and saving);
    benchmarks need the steady-state step time, hence these per-step times.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        @staticmethod
        def _sync() -> None:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def step_summary(step_times: Sequence[float], tokens_seen: int, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Median s/step after `warmup` steps and tokens/s (non-padding tokens of all processes per second of steps)."""
    if not step_times:
        return {"median_step_seconds": None, "tokens_per_second": None}
    timed = list(step_times[warmup:]) or list(step_times)
    med = statistics.median(timed)
    per_step = tokens_seen / max(1, steps)
    return {"median_step_seconds": round(med, 4), "tokens_per_second": round(per_step / med, 1) if med > 0 else None}


def peak_memory_gb() -> float:
    """Peak CUDA memory reserved (GiB) on a GPU, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_reserved() / 2**30, 3)
    from prodtune.bench import peak_rss_gib

    return round(peak_rss_gib(), 3)


def versions() -> dict[str, str]:
    """Versions of Python and the training stack, for the run card."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prodtune", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
