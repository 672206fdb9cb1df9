"""Small I/O helpers shared by every stage: atomic writes, JSON, the project root and home, logging.

    python -c "from prodtune.io import home_dir, project_root; print(project_root(), home_dir())"
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("prodtune")


def setup_logging(level: int = logging.INFO) -> None:
    """Log `prodtune.*` messages to stderr once, in a short format."""
    root = logging.getLogger("prodtune")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


def project_root(start: str | os.PathLike | None = None) -> Path:
    """Return the repository root: the first folder upwards that holds `configs/` and `src/prodtune/`.

    Notebooks run with their own folder as working directory (Jupyter, Colab) or the repo root
    (papermill from run_all.sh); both find the same root. From any other folder it is the checkout this package
    was installed from (an editable install), else the current directory. `PRODTUNE_ROOT` overrides all.
    """
    env = os.environ.get("PRODTUNE_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(start or Path.cwd()).resolve()
    for cand in [here, *here.parents]:
        if (cand / "configs").is_dir() and (cand / "src" / "prodtune").is_dir():
            return cand
    pkg = Path(__file__).resolve().parents[2]  # <root>/src/prodtune/io.py in a checkout
    if (pkg / "configs").is_dir() and (pkg / "src" / "prodtune").is_dir():
        return pkg
    return here


HOME_ENV = "PRODTUNE_HOME"  # one setting: where data/, models/ and outputs/ live (a Drive folder on Colab)


def home_dir() -> Path:
    """The folder that holds `data/`, `models/` and `outputs/`: `$PRODTUNE_HOME` when set, else the project root."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser().resolve() if env else project_root()


def at_home(path: str) -> str:
    """A profile's relative data/models/outputs path, under `$PRODTUNE_HOME` when that is set.

    Absolute paths stay as they are, and so does every path when `PRODTUNE_HOME` is unset (relative to the project
    root, where the notebooks and the CLI run). `at_home("data/cpu")` is `/content/drive/MyDrive/prodtune/data/cpu`
    with `PRODTUNE_HOME=/content/drive/MyDrive/prodtune`.
    """
    if not os.environ.get(HOME_ENV) or os.path.isabs(path):
        return path
    return str(home_dir() / path)


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back (once, at import: not thread-safe)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    A crash or exception leaves the old file (if any) untouched and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the mode a plain open() would (0666 minus the umask)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e


HEADLESS_ENV = "PRODTUNE_HEADLESS"  # set by `prodtune run` for the notebooks' kernels: print text, not widgets


def headless() -> bool:
    """True inside a notebook that `prodtune run` executes (its output goes to a terminal, not to a browser)."""
    return os.environ.get(HEADLESS_ENV) == "1"


@contextlib.contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable for the duration of a block (None: leave it as it is), then restore it."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


class UserError(Exception):
    """An error the user can fix (bad input, missing stage output, no GPU...): the CLI prints its message on one
    line on stderr and exits with code 2. Stage modules raise subclasses of it (or of ConfigError / InputError)."""


class InputError(UserError, OSError):
    """The input file cannot be read at all (missing, not a file, unreadable, empty)."""
