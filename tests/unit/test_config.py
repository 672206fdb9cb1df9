"""The one config loader: inheritance, per-track sections, recipes, overrides, templates; errors name the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from prodtune.config import ConfigError, build, field_help, known_profiles, load_config, load_profile, parse_overrides

ROOT = Path(__file__).parents[2]


@dataclass
class Toy:
    """A stage dataclass of the test's own: two tracks, a path template, a float and a list."""

    SECTION: ClassVar[str] = "train"
    TRACKS: ClassVar[tuple[str, ...]] = ("llama", "deepseek")

    track: str = field(default="llama", metadata={"help": "which track"})
    out_dir: str = field(default="{models_dir}/{track}", metadata={"help": "run folder"})
    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "input"})
    max_steps: int = field(default=-1, metadata={"help": "steps"})
    learning_rate: float = field(default=2e-4, metadata={"help": "lr"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "batch"})
    loss_on: str = field(default="completion", metadata={"help": "loss"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj"], metadata={"help": "LoRA targets"})
    seed: int | None = field(default=None, metadata={"help": "seed"})

    def __post_init__(self) -> None:
        if self.max_steps == 0:
            raise ConfigError("Toy.max_steps must not be 0")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def test_layers_in_order(tmp_path: Path) -> None:
    parent = _write(tmp_path, "parent", "train:\n  learning_rate: 1.0e-3\n  llama:\n    max_steps: 60\n"
                                        "  deepseek:\n    max_steps: 32\n    per_device_train_batch_size: 2\n"
                                        "    data_dir: '{data_dir}/cot'\n")
    child = _write(tmp_path, "child", f"inherit: {parent}\npaths:\n  models_dir: /m/{{profile}}\n"
                                      "train:\n  per_device_train_batch_size: 8\n  deepseek:\n    max_steps: 5\n")
    llama = load_config(Toy, child)
    assert (llama.track, llama.max_steps, llama.learning_rate, llama.out_dir) == ("llama", 60, 1e-3, "/m/child/llama")
    assert llama.data_dir == "data/child/prepared"  # the dataclass default's template is filled too
    ds = load_config(Toy, child, track="deepseek")
    # the child's per-track value wins; the child's shared batch size beats the parent's per-track one
    assert (ds.max_steps, ds.per_device_train_batch_size, ds.data_dir) == (5, 8, "data/child/cot")
    # --set beats the profile, a per-track --set beats a shared one, explicit values beat both
    ds = load_config(Toy, child, ["train.max_steps=7", "train.deepseek.learning_rate=5e-4", "train.learning_rate=1e-2"],
                     track="deepseek")
    assert (ds.max_steps, ds.learning_rate) == (7, 5e-4)
    assert load_config(Toy, child, ["train.max_steps=7"], max_steps=3).max_steps == 3


def test_recipe_is_a_layer_that_may_pick_the_track(tmp_path: Path) -> None:
    p = _write(tmp_path, "r", "train:\n  llama:\n    max_steps: 60\nrecipes:\n  study:\n    train:\n      track: llama\n"
                              "      loss_on: all\n      out_dir: '{models_dir}/study'\n")
    cfg = load_config(Toy, p, recipe="study")
    assert (cfg.loss_on, cfg.max_steps, cfg.out_dir) == ("all", 60, "models/r/study")
    with pytest.raises(ConfigError, match="recipe 'nope'.*known: \\['study'\\]"):
        load_config(Toy, p, recipe="nope")


@pytest.mark.parametrize(
    "values, match",
    [({"max_stesp": 3}, "unknown key.*max_stesp"), ({"max_steps": "many"}, "Toy.max_steps"),
     ({"max_steps": 1.5}, "max_steps"), ({"loss_on": 1}, "loss_on"), ({"max_steps": 0}, "must not be 0"),
     ({"target_modules": [1]}, "target_modules")],
)
def test_bad_values_are_config_errors(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(Toy, values)


def test_yaml_floats_written_as_2e_4_and_lists_from_one_string() -> None:
    cfg = build(Toy, {"learning_rate": "2e-4", "target_modules": "v_proj"})
    assert cfg.learning_rate == 2e-4 and cfg.target_modules == ["v_proj"]


def test_bad_profiles_overrides_tracks_and_templates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found.*known: .*cpu"):
        load_profile("no-such-profile")
    with pytest.raises(ConfigError, match="unknown section"):
        load_profile(_write(tmp_path, "bad", "trian:\n  max_steps: 3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(_write(tmp_path, "broken", "train: [\n"))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"inherit: {loop}\n")
    with pytest.raises(ConfigError, match="loop"):
        load_profile(loop)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["max_steps=3"])
    with pytest.raises(ConfigError, match="unknown track 'gpt'"):
        load_config(Toy, "cpu", track="gpt")
    with pytest.raises(ConfigError, match="cannot fill the template.*nowhere"):
        load_config(Toy, "cpu", out_dir="{nowhere}/x")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Toy, "cpu", ["train.llama.max_stesp=3"])


def test_profiles_are_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert {"cpu", "smoke", "colab-t4", "rtx4060-8gb", "h100"} <= set(known_profiles())
    assert load_profile("smoke")["data"]["sample"] == 160


def test_every_profile_builds_every_stage() -> None:
    from prodtune.cli import STAGES
    import importlib

    for name in known_profiles():
        for command, (module, _, _) in STAGES.items():
            cls = importlib.import_module(module).Config
            tracks = getattr(cls, "TRACKS", ()) or (None,)
            for track in tracks:
                cfg = load_config(cls, name, track=track)
                assert not any("{" in v for v in dataclasses.asdict(cfg).values() if isinstance(v, str)), (name, command)
                assert all(field_help(cls).values()), f"{cls.__name__}: every field needs a help text"


def test_the_study_recipe_trains_on_study_cleaned_data() -> None:
    from prodtune.data import Config as DataConfig
    from prodtune.train import Config as TrainConfig

    data = load_config(DataConfig, "cpu", recipe="study")
    train = load_config(TrainConfig, "cpu", recipe="study")
    assert data.cleaner == "study" and train.loss_on == "all" and train.track == "llama"
    assert train.data_dir == data.out_dir and train.out_dir != load_config(TrainConfig, "cpu").out_dir
    assert train.max_steps == load_config(TrainConfig, "cpu", track="llama").max_steps  # the Llama track's budget


def test_cpu_profile_says_what_it_changes() -> None:
    """Every key the cpu profile sets to a value other than the dataclass default carries a comment saying why."""
    import importlib

    from prodtune.cli import STAGES

    text = (ROOT / "configs" / "cpu.yaml").read_text()
    prof = load_profile("cpu")
    for module, _, _ in STAGES.values():
        cls = importlib.import_module(module).Config
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in (prof.get(cls.SECTION) or {}).items():
            if key in defaults and defaults[key] != value and not isinstance(value, dict):
                line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
                assert "#" in line, f"cpu.yaml: {cls.SECTION}.{key} differs from the default without a comment"
