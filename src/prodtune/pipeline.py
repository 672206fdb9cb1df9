"""Run the numbered notebooks in order with papermill, skipping stages whose outputs are up to date.

    prodtune run                      # every notebook on the cpu profile -> outputs/cpu/
    prodtune run --smoke              # the minutes-long smoke profile -> outputs/smoke/
    prodtune run --profile colab-t4 --force --only 03,04

`run_all.sh` installs the environment and then calls this. A stage is up to date when its executed notebook
exists and its fingerprint (the notebook, the profile, the package modules it uses, the upstream stages'
fingerprints and the input data) matches the one saved when it last succeeded. The run stops at the first
failing notebook and names it; rerunning resumes there (training resumes from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prodtune.config import fill_paths, load_profile, profile_path
from prodtune.io import log, project_root, read_json, write_json

SHARED_MODULES = ("config.py", "io.py", "notebook.py")


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline and the package modules whose code it runs."""

    key: str
    notebook: str
    modules: tuple[str, ...]


STAGES = (
    Stage("01", "notebooks/01_prepare_data.ipynb", ("data.py",)),
    Stage("02", "notebooks/02_generate_cot.ipynb", ("cot.py", "prompts.py", "models.py", "llm_client.py")),
    Stage("03", "notebooks/03_finetune_llama.ipynb", ("train.py", "prompts.py", "models.py", "gpu.py")),
    Stage("04", "notebooks/04_finetune_deepseek.ipynb", ("train.py", "prompts.py", "models.py", "gpu.py")),
    Stage("05", "notebooks/05_build_rag.ipynb", ("rag.py", "prompts.py", "models.py")),
    Stage("06", "notebooks/06_compare_models.ipynb", ("evaluate.py", "prompts.py", "models.py", "rag.py", "train.py")),
)


def _sha(h: "hashlib._Hash", path: Path) -> None:
    if path.is_file():
        h.update(path.name.encode())
        h.update(path.read_bytes())


def _profile_files(profile: str) -> list[Path]:
    """The profile's YAML and every profile it inherits from."""
    import yaml

    files, name = [], profile
    while name:
        p = profile_path(name)
        files.append(p)
        name = (yaml.safe_load(p.read_text()) or {}).get("inherit")
    return files


def notebook_params(stage: Stage, profile: str) -> dict[str, Any]:
    """Papermill parameters of a stage: PROFILE, plus the profile's `pipeline.notebook_params.<NN>` (smoke sizes)."""
    extra = (load_profile(profile).get("pipeline") or {}).get("notebook_params", {}) or {}
    return {"PROFILE": profile, **(extra.get(stage.key) or extra.get(int(stage.key)) or {})}


def fingerprint(stage: Stage, profile: str, upstream: str, root: Path) -> str:
    """Hash of everything that decides a stage's outputs."""
    h = hashlib.sha256()
    h.update(upstream.encode())
    h.update(json.dumps(notebook_params(stage, profile), sort_keys=True).encode())
    _sha(h, root / stage.notebook)
    for p in _profile_files(profile):
        _sha(h, p)
    for m in SHARED_MODULES + stage.modules:
        _sha(h, root / "src" / "prodtune" / m)
    if stage.key == "01":
        prof = load_profile(profile)
        data_input = root / fill_paths(prof["data"], prof).get("input", "data/sample/trn_sample.jsonl")
        if data_input.is_file():
            st = data_input.stat()
            h.update(f"{data_input}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def run_pipeline(profile: str = "cpu", force: bool = False, only: list[str] | None = None, timeout_s: int = 3600) -> dict[str, Any]:
    """Run the notebooks that exist, in order, into `outputs/<profile>/`; return per-stage status and seconds.

    Raises:
        SystemExit: with the failing notebook's name when one fails.
    """
    import papermill as pm

    root = project_root()
    os.chdir(root)
    prof = load_profile(profile)
    out_dir = root / fill_paths({"o": "{outputs_dir}"}, prof)["o"]
    stamps = out_dir / ".stamps"
    summary_path = out_dir / "pipeline.json"
    summary: dict[str, Any] = {"profile": prof["profile"], "stages": {}}
    upstream = ""
    t_all = time.perf_counter()
    for stage in STAGES:
        nb = root / stage.notebook
        if not nb.is_file():
            log.info("stage %s: %s does not exist yet, skipped", stage.key, stage.notebook)
            continue
        fp = fingerprint(stage, profile, upstream, root)
        upstream = fp
        executed = out_dir / nb.name
        stamp = stamps / f"{stage.key}.json"
        wanted = only is None or stage.key in only
        if not force and stamp.is_file() and executed.is_file() and read_json(stamp).get("fingerprint") == fp:
            log.info("stage %s: up to date (%s), skipped", stage.key, executed)
            summary["stages"][stage.key] = {"notebook": stage.notebook, "status": "up to date", **read_json(stamp)}
            continue
        if not wanted:
            log.info("stage %s: out of date but not in --only, skipped", stage.key)
            summary["stages"][stage.key] = {"notebook": stage.notebook, "status": "skipped (--only)"}
            continue
        log.info("stage %s: running %s -> %s", stage.key, stage.notebook, executed)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(nb), str(executed), parameters=notebook_params(stage, profile), cwd=str(root), kernel_name="python3",
                progress_bar=sys.stderr.isatty(), log_output=False, execution_timeout=timeout_s,
            )
        except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
            seconds = round(time.perf_counter() - t0, 1)
            summary["stages"][stage.key] = {"notebook": stage.notebook, "status": "failed", "seconds": seconds}
            write_json(summary_path, summary)
            msg = str(e).strip().splitlines()
            raise SystemExit(
                f"\nFAILED at {stage.notebook} after {seconds}s (executed copy with the error: {executed})\n"
                + "\n".join(msg[-15:])
            ) from None
        seconds = round(time.perf_counter() - t0, 1)
        write_json(stamp, {"fingerprint": fp, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        summary["stages"][stage.key] = {"notebook": stage.notebook, "status": "ran", "seconds": seconds, "fingerprint": fp}
        write_json(summary_path, summary)
        log.info("stage %s: done in %.1fs", stage.key, seconds)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(summary_path, summary)
    return summary


def add_parser(sub: Any) -> None:
    """Register `prodtune run`."""
    p = sub.add_parser("run", help="run the notebooks 01..06 with papermill (what run_all.sh does)")
    p.add_argument("--smoke", action="store_true", help="use the minutes-long smoke profile")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("--only", help="comma-separated stage numbers to (re)run, e.g. 03,04")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    profile = "smoke" if args.smoke else args.profile
    summary = run_pipeline(profile, force=args.force, only=args.only.split(",") if args.only else None)
    prof = load_profile(profile)
    out_dir = fill_paths({"o": "{outputs_dir}"}, prof)["o"]
    print(f"\n{'stage':<6}{'notebook':<40}{'status':<14}{'seconds':>8}")
    for key, s in summary["stages"].items():
        print(f"{key:<6}{Path(s['notebook']).name:<40}{s['status']:<14}{s.get('seconds', ''):>8}")
    print(f"total {summary['seconds']}s; executed notebooks in {out_dir}/")
    report = Path(out_dir) / "report.md"
    if report.is_file():
        print(f"report: {report} (also {report.with_suffix('.html')}); metrics: {Path(out_dir) / 'metrics.json'}")
    print(json.dumps({k: v.get("seconds") for k, v in summary["stages"].items()}))
    return 0
