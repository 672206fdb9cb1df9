"""Stage 06's tables, loss figure and report files (`report.md`, a standalone `report.html`), from jinja2 templates.

    python -c "from prodtune.evaluate import metrics_table, read_metrics; print(metrics_table(read_metrics('outputs/cpu')))"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from prodtune.decoding import describe_decoding
from prodtune.io import read_json, write_text

# Metrics shown x100 (shares and similarities in [0, 1]); chrF is already in points, tokens/s in tokens.
PERCENT = ("rouge_l", "embed_cos", "unsupported_rate", "copied_rate", "repetition", "empty", "endless", "think_ok")
DESCRIPTION_SYSTEMS = ("base", "base+rag", "llama-ft", "llama-ft+rag", "study-recipe", "deepseek-ft")

# The report's text. Markdown templates are not escaped; the HTML page escapes everything but the parts it is given
# already rendered (markdown's HTML and plotly's figure).
TEMPLATES = {
    "summary.md": """\
# prodtune report · profile `{{ meta.profile }}`

{% set data = meta.get("data") or {} %}{% set dec = meta.get("decoding_llama") or {} %}\
{% set rag = meta.get("rag") or {} %}{% if data.get("invented") %}\
**Data: the committed sample of invented text** (`{{ data.input }}`, written from templates by \
`data/sample/make_sample.py`). These figures measure how well a model learns those templates, not how it describes \
real products: for that, run the `real` profile (real AmazonTitles rows) or your own dump.

{% elif data.get("input") %}\
**Data: real product rows** from `{{ data.input }}`.

{% endif %}\
Base model `{{ meta.base_model }}`; {{ meta.n_test }} held-out test products; greedy decoding for every metric \
(the study sampled at temperature {{ meta.study_temperatures.llama }} for the Llama track and \
{{ meta.study_temperatures.deepseek }} for the DeepSeek track){% if describe_decoding(dec) %}, with the Llama run's \
decoding for the base and fine-tuned alike ({{ describe_decoding(dec) }}){% endif %}; RAG puts the top \
{{ meta.rag_k }} retrieved descriptions into the prompt{% if rag.get("min_score", 0) > 0 %} when their \
title is at least {{ rag.min_score }} cosine-similar ({{ meta.rag_shown }} of {{ meta.n_test }} test products \
had such a neighbour; the others get the plain prompt){% endif %} and never retrieves the product being described. \
{% set ds = meta.get("decoding_deepseek") or {} %}{% if describe_decoding(ds) %}The DeepSeek run decodes with its own \
settings, base and fine-tuned alike ({{ describe_decoding(ds) }}){% if ds.get("think_before_eos") %}: a reply that \
never closes its reasoning runs to the token limit and counts as endless, never as `think_ok`{% endif %}. {% endif %}\
Prompt version {{ meta.prompt_version }}; evaluation took {{ meta.seconds }} s.

## Metrics (mean [bootstrap 95% CI])

ROUGE-L, cosine, rates and think adherence in %, chrF in points, tokens/s on this machine. \
`unsupported_rate`: share of the answer's claims (numbers with their units, brand-like words) that the product's own \
title and reference description lack — a hallucination measure; `copied_rate`: the share of claims found only in a \
retrieved *other* product (copied from a neighbour; RAG systems). `endless`: hit the token limit without ending. `think_ok`: R1 completions that close \
`</think>` and then answer.

{{ metrics_table }}

## Differences between systems (paired bootstrap, a - b)

{{ comparisons_table or "_no pair of systems ran on the same rows_" }}
""",
    "examples.md": """\
## Example answers

{% for ex in examples %}
### {{ ex.title }}

**reference:** {{ ex.reference }}

{% for name, answer in ex.answers %}
**{{ name }}:** {{ answer or "_(empty)_" }}

{% endfor %}
{% endfor %}
""",
    "report.md": """\
{% include "summary.md" %}

## Training and validation loss

See the interactive figure in `report.html` (and `loss_curves.html`).

{% include "examples.md" %}
""",
    "report.html": """\
<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>prodtune report · {{ meta.profile }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em }
table { border-collapse: collapse; font-size: 13px }
td, th { border: 1px solid #ccc; padding: 3px 6px }
</style>
</head>
<body>
{{ summary }}
<h2>Training and validation loss</h2>
{% if figure %}
{{ figure }}
{% else %}
<p>no run cards found</p>
{% endif %}
{{ examples }}
</body>
</html>
""",
}


def _env() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
                              autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False))
    env.globals["describe_decoding"] = describe_decoding
    return env


def read_metrics(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The metrics dict a stage-06 run wrote to `<out_dir>/metrics.json`."""
    return read_json(Path(out_dir) / "metrics.json")


def metrics_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per system: mean [95% CI] of each metric, as text, for the report and the notebook."""
    rows = []
    for name, ms in result.items():
        if name in ("comparisons", "meta"):
            continue
        row = {"system": name, "n": next(iter(ms.values()))["n"] if ms else 0}
        for m, v in ms.items():
            scale = 100 if m in PERCENT else 1
            row[m] = f"{v['mean'] * scale:.1f} [{v['lo'] * scale:.1f}, {v['hi'] * scale:.1f}]"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–")  # think_ok exists only for R1-prompted systems


def comparisons_table(result: dict[str, Any]) -> pd.DataFrame:
    """Paired differences with CIs (ROUGE-L and cosine in points x100, chrF in points)."""
    rows = []
    for c in result.get("comparisons", []):
        s = 1 if c["metric"] == "chrf" else 100
        rows.append({"a - b": f"{c['a']} - {c['b']}", "metric": c["metric"], "diff": round(c["diff"] * s, 2),
                     "95% CI": f"[{c['lo'] * s:.2f}, {c['hi'] * s:.2f}]", "CI excludes 0": c["excludes_zero"],
                     "p": round(c["p"], 4), "question": c["question"]})
    return pd.DataFrame(rows)


def loss_histories(run_dirs: dict[str, str | os.PathLike]) -> pd.DataFrame:
    """Training and validation loss of every run card found: columns run, split, step, loss."""
    rows = []
    for run, d in run_dirs.items():
        card_path = Path(d) / "run_card.json"
        if not card_path.is_file():
            continue
        card = read_json(card_path)
        for split, key in (("train", "train_loss"), ("validation", "eval_loss")):
            for point in card.get(key) or []:
                if isinstance(point, dict):
                    rows.append({"run": run, "split": split, "step": point.get("step"), "loss": point.get("loss")})
                elif isinstance(point, (list, tuple)) and len(point) == 2:
                    rows.append({"run": run, "split": split, "step": point[0], "loss": point[1]})
    return pd.DataFrame(rows, columns=["run", "split", "step", "loss"])


def loss_figure(run_dirs: dict[str, str | os.PathLike]) -> Any:
    """Interactive plotly figure: train (solid) and validation (dashed) loss of each run, side by side; None if none."""
    import plotly.express as px

    df = loss_histories(run_dirs)
    if df.empty:
        return None
    fig = px.line(df, x="step", y="loss", color="run", line_dash="split", markers=True, facet_col="run",
                  title="Training and validation loss", labels={"step": "optimizer step"})
    fig.update_xaxes(matches=None)
    return fig


def examples_table(per_system: dict[str, pd.DataFrame], n: int) -> pd.DataFrame:
    """The first `n` description-task products with the reference and each system's answer."""
    desc = [s for s in DESCRIPTION_SYSTEMS if s in per_system]
    if not desc:
        return pd.DataFrame()
    first = per_system[desc[0]]
    rows = []
    for i in range(min(n, len(first))):
        row = {"title": title_of(first.prompt.iloc[i]), "reference": first.reference.iloc[i]}
        for s in desc:
            row[s] = per_system[s].answer.iloc[i]
        rows.append(row)
    return pd.DataFrame(rows)


def title_of(prompt: str) -> str:
    """The product title of an Alpaca prompt (the first line of its input)."""
    body = prompt.split("### Input:\n", 1)[-1]
    return body.split("\n", 1)[0].strip()


def render_report(result: dict[str, Any], per_system: dict[str, pd.DataFrame], n_examples: int = 4,
                  figure_html: str | None = None) -> tuple[str, str]:
    """The report as (markdown, standalone HTML); `figure_html` is the loss figure's HTML div (None: none)."""
    import markdown
    from markupsafe import Markup

    ex = examples_table(per_system, n_examples)
    ct = comparisons_table(result)
    ctx = {
        "meta": result["meta"],
        "metrics_table": metrics_table(result).to_markdown(index=False),
        "comparisons_table": ct.to_markdown(index=False) if not ct.empty else "",
        "examples": [{"title": r["title"], "reference": r["reference"],
                      "answers": [(s, r[s]) for s in ex.columns if s not in ("title", "reference")]}
                     for _, r in ex.iterrows()],
    }
    env = _env()
    md = env.get_template("report.md").render(**ctx)

    def html_of(name: str) -> Markup:
        return Markup(markdown.markdown(env.get_template(name).render(**ctx), extensions=["tables"]))

    page = env.get_template("report.html").render(meta=ctx["meta"], summary=html_of("summary.md"),
                                                  examples=html_of("examples.md"),
                                                  figure=Markup(figure_html) if figure_html else None)
    return md, page


def write_report(result: dict[str, Any], per_system: dict[str, pd.DataFrame], out: str | os.PathLike,
                 run_dirs: dict[str, str | os.PathLike], n_examples: int = 4) -> None:
    """Write `report.md`, a standalone `report.html` (tables, interactive loss curves, examples), `loss_curves.html`.

    Args:
        result: the stage's metrics dict (system -> metric -> {mean, lo, hi, n}, `comparisons`, `meta`).
        per_system: the per-row frames (for the example answers).
        out: the folder written.
        run_dirs: run name -> training run folder (their run cards give the loss curves).
        n_examples: products shown with every system's answer.
    """
    out = Path(out)
    fig = loss_figure(run_dirs)
    if fig is not None:
        write_text(out / "loss_curves.html", fig.to_html(include_plotlyjs="inline"))
    md, page = render_report(result, per_system, n_examples,
                             fig.to_html(full_html=False, include_plotlyjs="inline") if fig is not None else None)
    write_text(out / "report.md", md)
    write_text(out / "report.html", page)
