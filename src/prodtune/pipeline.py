"""Run the numbered notebooks in order with papermill, skipping stages whose outputs are up to date.

    prodtune run                      # every notebook on the cpu profile -> outputs/cpu/
    prodtune run --smoke              # the minutes-long smoke profile -> outputs/smoke/
    prodtune run --profile colab-t4 --force --only 03,04 --set train.max_steps=30 --timeout_s 7200

`run_all.sh` installs the environment and then calls this. Besides 01..06, the study's own recipe (the profile's
`recipes.study`: the study's cleaner, loss on every token) runs notebooks 01 and 03 a second time (stages `01s`,
`03s`) before stage 06 compares it, when the profile's `evaluate.systems` lists `study-recipe`.

A stage is up to date when its executed notebook exists and its fingerprint matches the one saved when it last
succeeded: the notebook, its parameters, the profile files, the source of every `prodtune` module the notebook
imports (followed through their own imports), the upstream stages' fingerprints and the input data. The run stops
at the first failing notebook and names it; rerunning resumes there (training resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prodtune.config import ConfigError, load_profile, paths_of, profile_layers
from prodtune.io import HEADLESS_ENV, env_var, log, project_root, read_json, write_json


@dataclass(frozen=True)
class Stage:
    """One papermill run of a notebook: key, notebook, extra parameters and the executed copy's name."""

    key: str
    notebook: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    recipe: str | None = None

    @property
    def executed_name(self) -> str:
        name = Path(self.notebook).name
        return name if not self.recipe else name.replace(".ipynb", f".{self.recipe}.ipynb")


STAGES = (
    Stage("01", "notebooks/01_prepare_data.ipynb"),
    Stage("01s", "notebooks/01_prepare_data.ipynb", {"RECIPE": "study"}, recipe="study"),
    Stage("02", "notebooks/02_generate_cot.ipynb"),
    Stage("03", "notebooks/03_finetune_llama.ipynb"),
    Stage("03s", "notebooks/03_finetune_llama.ipynb", {"RECIPE": "study", "N_EVAL": 4}, recipe="study"),
    Stage("04", "notebooks/04_finetune_deepseek.ipynb"),
    Stage("05", "notebooks/05_build_rag.ipynb"),
    Stage("06", "notebooks/06_compare_models.ipynb"),
)


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _imports(tree: ast.AST, pkg: str = "", package: str = "prodtune") -> set[str]:
    """`prodtune.*` modules a piece of code imports, anywhere in it (lazy imports inside functions included);
    `pkg` is the package the code belongs to, for relative imports. `from a import b` gives `a` and `a.b`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == package}


def _module_file(name: str, src: Path) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (src / rel.with_suffix(".py"), src / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def module_closure(code: str, src: Path | None = None) -> list[Path]:
    """The source files of every `prodtune` module `code` imports, followed through their imports; sorted."""
    src = src or project_root() / "src"
    todo, files, seen = list(_imports(ast.parse(code))), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a submodule runs its packages' __init__ too
        path = _module_file(name, src)
        if path is None:  # a name imported from a module, not a module
            continue
        files.add(path)
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += list(_imports(ast.parse(path.read_text(encoding="utf-8")), pkg))
    return sorted(files)


def notebook_code(path: Path) -> str:
    """The code cells of a notebook, joined (for the import scan)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"] if c["cell_type"] == "code"]
    # IPython magics and shell lines are not Python
    return "\n".join(line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!")))


def notebook_params(stage: Stage, profile: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Papermill parameters of a stage: PROFILE, OVERRIDES, the stage's own, then the profile's
    `pipeline.notebook_params.<NN>` (smoke sizes)."""
    extra = (load_profile(profile).get("pipeline") or {}).get("notebook_params", {}) or {}
    nn = stage.key[:2]
    params = {"PROFILE": profile, "OVERRIDES": list(overrides), **(extra.get(nn) or extra.get(int(nn)) or {}), **stage.params}
    return params


def fingerprint(stage: Stage, profile: str, upstream: str, root: Path, overrides: Sequence[str] = ()) -> str:
    """Hash of everything that decides a stage's outputs."""
    h = hashlib.sha256()
    h.update(upstream.encode())
    h.update(json.dumps(notebook_params(stage, profile, overrides), sort_keys=True).encode())
    nb = root / stage.notebook
    h.update(nb.read_bytes())
    for p, _ in profile_layers(profile):
        h.update(p.name.encode() + p.read_bytes())
    for m in module_closure(notebook_code(nb), root / "src"):
        h.update(str(m.relative_to(root)).encode() + m.read_bytes())
    if stage.key.startswith("01"):
        from prodtune.config import load_config
        from prodtune.data import Config as DataConfig
        from prodtune.data.fetch import local_input

        spec = Path(load_config(DataConfig, profile, overrides, recipe=stage.recipe).input)
        # under the root (the sample), else under PRODTUNE_HOME (a copy of the dump); a URL counts by its text
        data_input = root / spec if (root / spec).exists() else local_input(spec)
        if data_input.is_file():
            st = data_input.stat()
            h.update(f"{data_input}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def stages_for(profile: str) -> list[Stage]:
    """The stages a profile runs: the study recipe's only when stage 06 compares it."""
    prof = load_profile(profile)
    systems = (prof.get("evaluate") or {}).get("systems")
    wants_study = systems is None or "study-recipe" in systems
    has_recipe = "study" in (prof.get("recipes") or {})
    return [s for s in STAGES if s.recipe != "study" or (wants_study and has_recipe)]


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def run_pipeline(profile: str = "cpu", force: bool = False, only: Sequence[str] | None = None,
                 overrides: Sequence[str] = (), timeout_s: int | None = 3600) -> dict[str, Any]:
    """Run the notebooks in order into `outputs/<profile>/`; return per-stage status and seconds.

    Args:
        profile: profile name or YAML path.
        force: rerun stages that are up to date.
        only: stage keys to (re)run (`01`, `03s`...); others run only if out of date and needed.
        overrides: `section.key=value` strings passed to every notebook as `OVERRIDES` (and fingerprinted).
        timeout_s: longest a notebook cell may run (None: no limit).

    Raises:
        SystemExit: with the failing notebook's name when one fails.
    """
    import papermill as pm

    root = project_root()
    os.chdir(root)
    prof = load_profile(profile, overrides)
    out_dir = root / paths_of(prof)["outputs_dir"]
    stamps = out_dir / ".stamps"
    summary_path = out_dir / "pipeline.json"
    summary: dict[str, Any] = {"profile": prof["profile"], "overrides": list(overrides), "stages": {}}
    upstream = ""
    t_all = time.perf_counter()
    for stage in stages_for(profile):
        nb = root / stage.notebook
        fp = fingerprint(stage, profile, upstream, root, overrides)
        upstream = fp
        executed = out_dir / stage.executed_name
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
            # Each cell's text (progress bars, training steps and loss, generation counts) goes to the terminal as
            # it runs; HEADLESS_ENV (inherited by the kernel) makes the notebooks print text, not widgets.
            with env_var(HEADLESS_ENV, "1"):
                pm.execute_notebook(
                    str(nb), str(executed), parameters=notebook_params(stage, profile, overrides), cwd=str(root),
                    kernel_name="python3", progress_bar=sys.stderr.isatty(), log_output=False, stdout_file=sys.stderr,
                    stderr_file=sys.stderr, execution_timeout=timeout_s,
                )
        except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
            seconds = round(time.perf_counter() - t0, 1)
            summary["stages"][stage.key] = {"notebook": stage.notebook, "status": "failed", "seconds": seconds}
            write_json(summary_path, summary)
            msg = str(e).strip().splitlines()
            raise SystemExit(
                f"\nFAILED at stage {stage.key} ({stage.notebook}) after {seconds}s (executed copy with the error: {executed})\n"
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


def make_parser() -> argparse.ArgumentParser:
    """Flags of `prodtune run`."""
    p = argparse.ArgumentParser(prog="prodtune run", description="run the notebooks 01..06 with papermill (what run_all.sh does)")
    p.add_argument("--profile", default="cpu", help="profile name or YAML path (default: cpu)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value in every notebook")
    p.add_argument("--smoke", action="store_true", help="use the minutes-long smoke profile")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("--only", help="comma-separated stage keys to (re)run, e.g. 03,04 (keys: "
                                  + ", ".join(s.key for s in STAGES) + ")")
    p.add_argument("--timeout_s", "--timeout-s", type=int, default=3600, help="longest a notebook cell may run, seconds; 0: no limit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`prodtune run`."""
    args = make_parser().parse_args(list(argv or []))
    profile = "smoke" if args.smoke else args.profile
    only = args.only.split(",") if args.only else None
    if only:
        bad = set(only) - {s.key for s in STAGES}
        if bad:
            raise ConfigError(f"--only: unknown stage(s) {sorted(bad)}; stages are {[s.key for s in STAGES]}")
    summary = run_pipeline(profile, force=args.force, only=only, overrides=args.set, timeout_s=args.timeout_s or None)
    out_dir = paths_of(load_profile(profile, args.set))["outputs_dir"]
    print(f"\n{'stage':<6}{'notebook':<44}{'status':<14}{'seconds':>8}")
    for key, s in summary["stages"].items():
        name = next((st.executed_name for st in STAGES if st.key == key), Path(s["notebook"]).name)
        print(f"{key:<6}{name:<44}{s['status']:<14}{s.get('seconds', ''):>8}")
    print(f"total {summary['seconds']}s; executed notebooks in {out_dir}/")
    report = Path(out_dir) / "report.md"
    if report.is_file():
        print(f"report: {report} (also {report.with_suffix('.html')}); metrics: {Path(out_dir) / 'metrics.json'}")
    print(json.dumps({k: v.get("seconds") for k, v in summary["stages"].items()}))
    return 0
