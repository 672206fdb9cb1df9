"""Build an output-free .ipynb from a percent-format script (`# %%` code cells, `# %% [markdown]` cells).

    python tools/nbgen.py notebooks/src/01_prepare_data.py notebooks/01_prepare_data.ipynb

A cell whose first line is `# %% tags=["parameters"]` is tagged `parameters` for papermill.
Notebooks are the committed source; this only saves typing JSON by hand.
"""

import re
import sys

import nbformat


def build(src: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for chunk in re.split(r"^(?=# %%)", src, flags=re.M):
        if not chunk.strip():
            continue
        head, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if "[markdown]" in head:
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cell = nbformat.v4.new_code_cell(body)
            if "parameters" in head:
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, c in enumerate(nb.cells):
        c["id"] = f"c{i:02d}"
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    nb = build(open(src, encoding="utf-8").read())
    nbformat.write(nb, dst)
    print(f"wrote {dst} ({len(nb.cells)} cells)")
