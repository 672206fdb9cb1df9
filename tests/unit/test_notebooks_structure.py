"""Every notebook is valid, output-free, thin, and has a `parameters` cell with PROFILE (cheap structural gate)."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_pipeline_notebooks_exist() -> None:
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    assert NOTEBOOKS[0].name == "01_prepare_data.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parametrised(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "PROFILE" in params[0].source
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for c in code:
        src = "\n".join(line for line in c.source.splitlines() if not line.lstrip().startswith(("!", "%")))
        tree = ast.parse(src)  # every code cell parses
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(tree)), "logic belongs in src/prodtune"
    assert len(nb.cells) <= 24


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path: Path) -> None:
    """papermill parses the parameters cell line by line (for --help-notebook and type hints); a line it cannot
    read is logged as 'Unable to parse line' on every run and the parameter goes missing from its help."""
    from papermill.translators import PythonTranslator

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert [p.name for p in PythonTranslator.inspect(cell)] == assigned


def test_notebooks_equal_a_fresh_build_from_the_template() -> None:
    """notebooks/*.ipynb are built by tools/make_notebooks.py from notebooks/src (the Colab cell lives in one place)."""
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    res = subprocess.run([sys.executable, "tools/make_notebooks.py", "--check"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_shares_the_template(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name in ("PROFILE", "RECIPE", "OVERRIDES"):
        assert f"\n{name} =" in "\n" + params.source, name
    assert "google.colab" in code[0]  # the install cell comes first
    assert f'notebook.setup("{path.name[:2]}", PROFILE, RECIPE, OVERRIDES)' in code[3]
    assert "notebook.record(" in code[-1]  # the last cell records results for tests
    assert nb.metadata.get("accelerator") == "GPU"  # Colab opens it on a GPU runtime


def _make_notebooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", Path(__file__).parents[2] / "tools" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_open_in_colab_link_and_clone_come_from_the_one_setting(path: Path) -> None:
    import tomllib

    repo = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    owner_name = repo.removeprefix("https://github.com/")
    nb = nbformat.read(path, as_version=4)
    link = f"(https://colab.research.google.com/github/{owner_name}/blob/main/notebooks/{path.name})"
    assert link in nb.cells[0].source.splitlines()[2]  # under the title
    assert f'os.environ.get("PRODTUNE_REPO", "{repo}")' in nb.cells[1].source
    assert "drive.mount(" in nb.cells[1].source and "PRODTUNE_HOME" in nb.cells[1].source
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"


def test_the_readme_links_follow_the_setting() -> None:
    mk = _make_notebooks()
    readme = mk.README.read_text()
    sources = sorted(mk.SRC.glob("[0-9][0-9]_*.py"))
    assert mk.with_readme_block(readme, mk.readme_block(sources, mk.repository())) == readme  # what --check checks
    fork = mk.readme_block(sources, "https://github.com/someone/prodtune-fork.git")
    assert fork.count("colab.research.google.com/github/someone/prodtune-fork/blob/main/notebooks/") == len(sources)
    assert mk.with_readme_block(readme, fork) != readme  # a changed address makes --check fail
    with pytest.raises(SystemExit, match="Colab opens GitHub files only"):
        mk.colab_url("https://gitlab.com/a/b", "01_prepare_data.ipynb")
