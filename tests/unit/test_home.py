"""PRODTUNE_HOME: one setting puts every profile's data/, models/ and outputs/ under a folder that outlives the
checkout (a Drive folder on Colab); unset, the paths are exactly what they were (relative to the project root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prodtune.config import load_config, load_profile, paths_of
from prodtune.io import at_home, home_dir, project_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRODTUNE_HOME", raising=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "drive" / "prodtune"
    monkeypatch.setenv("PRODTUNE_HOME", str(h))
    return h


@pytest.mark.usefixtures("no_home")
def test_unset_the_paths_are_as_before() -> None:
    assert home_dir() == project_root()
    assert at_home("data/cpu") == "data/cpu"
    assert paths_of(load_profile("cpu")) == {"profile": "cpu", "data_dir": "data/cpu", "models_dir": "models/cpu",
                                              "outputs_dir": "outputs/cpu"}
    from prodtune.data import Config

    assert load_config(Config, "cpu").out_dir == "data/cpu/prepared"


@pytest.mark.parametrize("path, under_home", [("data/cpu", True), ("outputs/x/y", True), ("/abs/models", False)])
def test_at_home(home: Path, path: str, under_home: bool) -> None:
    assert at_home(path) == (str(home / path) if under_home else path)
    assert home_dir() == home


def test_home_with_a_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PRODTUNE_HOME", "~/prodtune")
    assert at_home("data/cpu") == str(tmp_path / "prodtune" / "data" / "cpu")


def test_every_stage_folder_lives_under_the_home(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prodtune.data import Config as DataConfig
    from prodtune.evaluate import EvalConfig
    from prodtune.rag import RagConfig
    from prodtune.train import TrainConfig

    assert paths_of(load_profile("colab-t4")) == {"profile": "colab-t4", "data_dir": str(home / "data/colab-t4"),
                                                   "models_dir": str(home / "models/colab-t4"),
                                                   "outputs_dir": str(home / "outputs/colab-t4")}
    data = load_config(DataConfig, "cpu")
    assert data.out_dir == str(home / "data/cpu/prepared")
    assert load_config(TrainConfig, "cpu", track="llama").out_dir == str(home / "models/cpu/llama")  # checkpoints: resume
    assert load_config(TrainConfig, "cpu", track="deepseek").data_dir == str(home / "data/cpu/cot")
    rag = load_config(RagConfig, "cpu")
    assert rag.persist_dir == str(home / "models/cpu/chroma") and rag.data_dir == str(home / "data/cpu/prepared")
    assert load_config(EvalConfig, "cpu").llama_dir == str(home / "models/cpu/llama")
    # the committed sample is not under the home: it is still read from the checkout
    from prodtune.data.fetch import local_input

    monkeypatch.chdir(tmp_path)  # not the checkout
    assert data.input == "data/sample/trn_sample.jsonl"
    assert local_input(data.input) == ROOT / "data/sample/trn_sample.jsonl"


def test_an_absolute_profile_path_stays(home: Path, tmp_path: Path) -> None:
    prof = tmp_path / "mine.yaml"
    prof.write_text(f"inherit: cpu\npaths:\n  outputs_dir: {tmp_path}/out\n")
    paths = paths_of(load_profile(str(prof)))
    assert paths["outputs_dir"] == f"{tmp_path}/out" and paths["data_dir"] == str(home / "data/mine")


def test_an_input_under_the_home_is_found(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prodtune.data.fetch import local_input

    monkeypatch.chdir(tmp_path)
    (home / "data/raw").mkdir(parents=True)
    (home / "data/raw/trn.json.gz").write_bytes(b"")
    assert local_input("data/raw/trn.json.gz") == home / "data/raw/trn.json.gz"
    assert local_input("data/sample/trn_sample.jsonl") == project_root() / "data/sample/trn_sample.jsonl"
    assert local_input("nowhere.json") == Path("nowhere.json")  # as given: reading it names it in the error


def test_records_and_the_pipeline_outputs_go_to_the_home(home: Path) -> None:
    from prodtune import notebook

    stage = notebook.setup("01", "cpu")
    assert stage.records == home / "outputs/cpu/records/01.json"
    assert Path.cwd() == project_root()  # the notebook still runs in the checkout (the sample, the configs)
    assert os.environ["PRODTUNE_HOME"] == str(home)
