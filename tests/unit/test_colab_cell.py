"""The notebooks' Colab cell, run as Colab runs it: a stand-in `google.colab` (its drive.mount makes the folder), a
stand-in pip that records what it is asked to install, the project cloned from a git copy of this working tree; then
the next cells import prodtune in the same process, with no restart. Plus what decides the installs: `colab.missing`
and requirements-colab.txt against the project's other pins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
NB01 = ROOT / "notebooks" / "01_prepare_data.ipynb"

STANDIN_DRIVE = '''\
import json, os
def mount(mountpoint, force_remount=False, **kwargs):
    os.makedirs(os.path.join(mountpoint, "MyDrive"), exist_ok=True)
    with open(os.environ["STANDIN_LOG"], "a") as fh:
        fh.write(json.dumps({"mount": mountpoint}) + "\\n")
'''
STANDIN_PIP = '''\
import json, os, sys
args = sys.argv[1:]
constraints = {a: open(a).read() for a, prev in zip(args[1:], args) if prev == "-c"}
with open(os.environ["STANDIN_LOG"], "a") as fh:
    fh.write(json.dumps({"pip": args, "constraints": constraints}) + "\\n")
'''
DRIVER = '''\
import json, os, sys
src = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != src]  # not the editable install: the cell's clone
try:
    import prodtune
    sys.exit("prodtune was importable before the Colab cell ran")
except ImportError:
    pass
import google.colab  # Colab's kernel starts with it loaded
cells = json.loads(open(sys.argv[2]).read())
exec(compile(cells["colab"], "colab-cell", "exec"))
exec(compile(cells["colab"], "colab-cell-again", "exec"))  # a rerun in the same kernel does nothing more
exec(compile(cells["imports"], "imports-cell", "exec"))  # the next cell: no restart in between
stage = notebook.setup("01", None, None, [])
from prodtune.config import load_config, load_profile, paths_of
print("RESULT " + json.dumps({
    "notebook": notebook.__file__, "cwd": os.getcwd(), "home": os.environ.get("PRODTUNE_HOME"),
    "pythonpath": os.environ.get("PYTHONPATH"), "in_colab": notebook.in_colab(), "profile": stage.profile,
    "records": str(stage.records), "paths": paths_of(load_profile(stage.profile)),
    "input": load_config(data.Config, stage.profile).input}))
'''


def _cells() -> dict[str, str]:
    nb = nbformat.read(NB01, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    return {"colab": code[0], "imports": code[1]}


@pytest.fixture
def project_repo(tmp_path: Path) -> str:
    """A git repository of this working tree (tracked and untracked, not ignored files) as a file:// URL."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "upstream"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    return repo.as_uri()


def _standins(tmp_path: Path) -> Path:
    d = tmp_path / "standins"
    (d / "google" / "colab").mkdir(parents=True)  # `google` stays a namespace package (protobuf shares it)
    (d / "google" / "colab" / "__init__.py").write_text("")
    (d / "google" / "colab" / "drive.py").write_text(STANDIN_DRIVE)
    (d / "pip").mkdir()
    (d / "pip" / "__init__.py").write_text("")
    (d / "pip" / "__main__.py").write_text(STANDIN_PIP)
    return d


def test_colab_cell_mounts_drive_clones_installs_the_missing_pins_and_prodtune_imports_without_restart(
        tmp_path: Path, project_repo: str) -> None:
    content = tmp_path / "content"  # Colab's working folder
    content.mkdir()
    drive = tmp_path / "content" / "drive"
    cells = _cells()
    assert cells["colab"].count('"/content/drive"') == 1 and cells["colab"].count("/content/drive/MyDrive/prodtune") == 1
    cells["colab"] = cells["colab"].replace("/content/drive", str(drive))  # the only change: where Drive mounts
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    (tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / "standins.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRODTUNE_", "COLAB_"))}
    env.update(PYTHONPATH=str(_standins(tmp_path)), PRODTUNE_REPO=project_repo, STANDIN_LOG=str(log),
               HOME=str(tmp_path / "home"), GIT_CONFIG_NOSYSTEM="1")
    res = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(ROOT / "src"), str(tmp_path / "cells.json")],
                         cwd=content, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    clone = content / "prodtune"
    home = drive / "MyDrive" / "prodtune"

    # Drive mounted once; the home is on it and every profile folder lives under it
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["mount"] for c in calls if "mount" in c] == [str(drive)]
    assert (drive / "MyDrive").is_dir()
    assert out["home"] == str(home)
    assert out["paths"]["data_dir"] == str(home / "data" / "cpu")
    assert out["paths"]["models_dir"] == str(home / "models" / "cpu")
    assert out["records"] == str(home / "outputs" / "cpu" / "records" / "01.json")
    assert out["input"] == "data/sample/trn_sample.jsonl" and (clone / out["input"]).is_file()  # read from the clone

    # the project was cloned (not the checkout this test runs from) and imported from there, in the same process
    assert (clone / ".git").is_dir() and Path(out["cwd"]) == clone.resolve()
    assert Path(out["notebook"]).resolve() == (clone / "src" / "prodtune" / "notebook.py").resolve()
    assert out["pythonpath"].split(os.pathsep)[0] == str(clone.resolve() / "src")
    assert out["in_colab"] is True
    assert out["profile"] == "cpu" and "PROFILE = None: using profile 'cpu' (no CUDA GPU is visible)" in res.stdout

    # pip was asked once, for the pins this environment lacks (the GPU ones on a CPU machine), never for torch;
    # torch as installed is a constraint; the embedded models are all here, so no second call
    pips = [c for c in calls if "pip" in c]
    assert len(pips) == 1, pips
    args = pips[0]["pip"]
    assert args[:2] == ["install", "-q"]
    asked = args[2:args.index("-c")]
    gpu = [line.split("#")[0].strip() for line in (ROOT / "requirements-gpu.txt").read_text().splitlines()]
    gpu = [g for g in gpu if g]
    from importlib.metadata import PackageNotFoundError, version

    def _have(req: str) -> bool:
        try:
            return Requirement(req).specifier.contains(version(Requirement(req).name))
        except PackageNotFoundError:
            return False

    assert asked == [g for g in gpu if not _have(g)]
    assert not any(Requirement(a).name.startswith("torch") for a in asked)
    torch_pin = next(v for k, v in pips[0]["constraints"].items() if "torch-pins" in k)
    assert f"torch=={version('torch')}\n" in torch_pin
    assert any(k.endswith("requirements-colab.txt") for k in pips[0]["constraints"])


def test_colab_cell_does_nothing_outside_colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRODTUNE_HOME", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert "google.colab" not in sys.modules
    exec(compile(_cells()["colab"], "colab-cell", "exec"), {})
    assert list(tmp_path.iterdir()) == [] and "PRODTUNE_HOME" not in os.environ and Path.cwd() == tmp_path


@pytest.mark.parametrize("req, installed, is_missing", [
    ("transformers==5.17.0", {"transformers": "5.17.0"}, False),
    ("transformers==5.17.0", {"transformers": "4.57.1"}, True),    # Colab's older copy is replaced
    ("unsloth_zoo==2026.10.9", {"unsloth-zoo": "2026.10.9"}, False),  # names compare normalised
    ("unsloth==2026.10.9", {}, True),
    ("pandas>=2.2", {"pandas": "2.2.2"}, False),                    # Colab's own copy is kept
    ("pandas>=2.2", {"pandas": "2.1.4"}, True),
    ("ipywidgets>=7.7", {"ipywidgets": "7.7.1"}, False),
])
def test_missing_compares_versions_with_the_requirement(req: str, installed: dict, is_missing: bool) -> None:
    from prodtune.colab import missing

    assert missing([req], installed) == ([req] if is_missing else [])


def test_missing_refuses_torch() -> None:
    from prodtune.colab import missing

    with pytest.raises(ValueError, match="CUDA build"):
        missing(["torch==2.13.0"], {})


def _reqs(name: str) -> dict[str, Requirement]:
    from prodtune.colab import read_requirements

    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in read_requirements(ROOT / name)}


def test_colab_requirements_follow_the_project_pins() -> None:
    """Every CPU and GPU requirement is in requirements-colab.txt (but torch and the test tools): the same pin, or a
    range Colab's copy meets and the CPU pin meets too; and nothing there is pinned to another version."""
    colab, cpu, gpu = _reqs("requirements-colab.txt"), _reqs("requirements.txt"), _reqs("requirements-gpu.txt")
    assert not {"torch", "torchvision", "torchaudio", "triton"} & set(colab)
    for name, req in {**cpu, **gpu}.items():
        if name in ("torch", "pytest", "playwright"):
            continue
        assert name in colab, f"{name} is missing from requirements-colab.txt"
        pinned = str(req.specifier)[2:]
        assert colab[name].specifier.contains(pinned), f"requirements-colab.txt: {colab[name]} excludes {req}"
        if str(colab[name].specifier).startswith("=="):
            assert str(colab[name].specifier) == str(req.specifier), f"{colab[name]} vs {req}"
    assert set(colab) <= set(cpu) | set(gpu), set(colab) - set(cpu) - set(gpu)
