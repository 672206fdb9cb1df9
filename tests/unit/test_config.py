"""Profiles: inheritance, overrides, unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from prodtune.config import ConfigError, build, load_profile, parse_overrides, stage_config
from prodtune.data import DataConfig


def test_every_profile_loads_and_builds_the_data_stage() -> None:
    for p in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        prof = load_profile(p.stem)
        assert prof["profile"] == p.stem
        cfg = stage_config(DataConfig, p.stem, "data")
        assert cfg.out_dir.startswith(f"data/{p.stem}")


def test_inherit_and_overrides(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("inherit: smoke\ndata:\n  seed: 7\n")
    prof = load_profile(child, ["data.min_content_chars=50"])
    assert prof["data"]["sample"] == 160 and prof["data"]["seed"] == 7 and prof["data"]["min_content_chars"] == 50
    assert prof["data"]["input"] == "data/sample/trn_sample.jsonl"  # from cpu, two levels up


@pytest.mark.parametrize(
    "values, match",
    [({"sampel": 3}, "unknown key"), ({"sample": "many"}, "sample"), ({"seed": 1.5}, "seed"), ({"write_jsonl": 1}, "write_jsonl")],
)
def test_bad_values_are_rejected(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(DataConfig, values)


def test_bad_profile_and_override_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile("no-such-profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["max_steps=3"])
