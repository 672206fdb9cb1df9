"""The pipeline's plan: which stages run, with which parameters, and what decides that a stage is up to date."""

from __future__ import annotations

from pathlib import Path

from prodtune.pipeline import STAGES, module_closure, notebook_code, notebook_params, stages_for

ROOT = Path(__file__).parents[2]


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    pkg = src / "prodtune"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("import json\n")
    (pkg / "prompts.py").write_text("from prodtune.io import x\n")
    (pkg / "unused.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("from .stage import run\n")
    (pkg / "train" / "stage.py").write_text("def run():\n    from ..prompts import y  # lazy, relative, two levels\n")
    return src


def test_module_closure_follows_lazy_and_relative_imports(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    files = {p.relative_to(src).as_posix() for p in module_closure("from prodtune import train\n", src)}
    assert files == {"prodtune/__init__.py", "prodtune/train/__init__.py", "prodtune/train/stage.py",
                     "prodtune/prompts.py", "prodtune/io.py"}


def test_each_notebook_is_fingerprinted_by_the_modules_it_runs() -> None:
    for stage, must in (("01", "data"), ("03", "train"), ("05", "rag"), ("06", "evaluate")):
        nb = ROOT / next(s.notebook for s in STAGES if s.key == stage)
        names = {p.relative_to(ROOT / "src" / "prodtune").parts[0].removesuffix(".py") for p in module_closure(notebook_code(nb))}
        assert must in names and "config" in names, (stage, names)
    nb01 = ROOT / STAGES[0].notebook
    names01 = {p.relative_to(ROOT / "src" / "prodtune").parts[0].removesuffix(".py") for p in module_closure(notebook_code(nb01))}
    assert "train" not in names01 and "rag" not in names01  # stage 01 does not rerun when training code changes


def test_the_study_recipe_runs_before_06_with_its_parameters() -> None:
    keys = [s.key for s in stages_for("cpu")]
    assert keys == ["01", "01s", "02", "03", "03s", "04", "05", "06"]
    p = notebook_params(next(s for s in STAGES if s.key == "03s"), "cpu", ["train.max_steps=5"])
    assert p["RECIPE"] == "study" and p["OVERRIDES"] == ["train.max_steps=5"] and p["PROFILE"] == "cpu"


def test_no_study_stages_when_06_does_not_compare_it(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("inherit: cpu\nevaluate:\n  systems: [base, llama-ft]\n")
    assert [s.key for s in stages_for(str(prof))] == ["01", "02", "03", "04", "05", "06"]
