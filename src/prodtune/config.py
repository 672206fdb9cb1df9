"""Profiles: one YAML file per machine under `configs/`, one section per stage.

Each stage module defines a dataclass (`DataConfig`, `CoTConfig`, `TrainConfig`, `RagConfig`,
`EvalConfig`) whose defaults are the embedded offline CPU setting. A profile states only what differs,
may `inherit:` another profile, and may not name a key the dataclass does not have.

    python -c "from prodtune.config import load_profile; print(load_profile('cpu'))"
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prodtune.io import project_root

T = TypeVar("T")

SECTIONS = ("paths", "data", "cot", "train", "rag", "evaluate", "pipeline")


class ConfigError(ValueError):
    """A profile or override names an unknown key or a value of the wrong type."""


def profile_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a profile name (`cpu`) or a path (`configs/cpu.yaml`) to an existing YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        cands = [p, project_root() / p]
    else:
        cands = [project_root() / "configs" / f"{name_or_path}.yaml"]
    for c in cands:
        if c.is_file():
            return c.resolve()
    known = sorted(x.stem for x in (project_root() / "configs").glob("*.yaml"))
    raise ConfigError(f"profile {name_or_path!r} not found (looked at {', '.join(map(str, cands))}); known: {known}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_profile(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, dict]:
    """Load a profile (following `inherit:`), apply `section.key=value` overrides, return sections.

    The result always has `profile` (the profile's name) and one dict per section in `SECTIONS`.
    """
    path = profile_path(name_or_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    parent = raw.pop("inherit", None)
    base = load_profile(parent) if parent else {}
    base.pop("profile", None)
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; sections are {list(SECTIONS)}")
    merged = _merge(base, raw)
    for sec in SECTIONS:
        merged.setdefault(sec, {})
        if merged[sec] is None:
            merged[sec] = {}
    merged = _merge(merged, parse_overrides(overrides or []))
    merged["profile"] = path.stem
    return merged


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """Turn `["train.max_steps=20", "data.sample=null"]` into `{"train": {"max_steps": 20}, ...}`."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        sec, dot, field = key.lstrip("-").partition(".")
        if not sep or not dot or sec not in SECTIONS:
            raise ConfigError(f"override {item!r} must look like section.key=value with section in {list(SECTIONS)}")
        out.setdefault(sec, {})[field] = yaml.safe_load(value)
    return out


def _check_type(cls_name: str, name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if tp is type(None) or (origin is typing.Union and type(None) in args) or "None" in str(tp):
            return None
        raise ConfigError(f"{cls_name}.{name}: null is not allowed (expected {tp})")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{cls_name}.{name}: {value!r} is not {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name}: expected a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{cls_name}.{name}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"{cls_name}.{name}: {value!r} is not {tp.__name__}")
    return value


def build(cls: type[T], values: dict[str, Any] | None = None, **extra: Any) -> T:
    """Build the dataclass `cls` from a profile section, rejecting unknown keys and wrong types."""
    values = {**(values or {}), **{k: v for k, v in extra.items() if v is not None}}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    checked = {k: _check_type(cls.__name__, k, v, hints[k]) for k, v in values.items()}
    return cls(**checked)


def describe(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass, for run cards and logs."""
    return dataclasses.asdict(cfg)


def stage_config(cls: type[T], profile: str | os.PathLike, section: str, overrides: list[str] | None = None, **extra: Any) -> T:
    """Load `profile` and build the dataclass of one stage section (with path templates filled)."""
    prof = load_profile(profile, overrides)
    cfg = build(cls, prof[section], **extra)
    # Templates ({data_dir}, ...) may come from the profile, the command line or the dataclass defaults.
    templated = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), str)}
    return dataclasses.replace(cfg, **fill_paths(templated, prof))


def fill_paths(values: dict[str, Any], prof: dict[str, Any]) -> dict[str, Any]:
    """Replace `{profile}`, `{data_dir}`, `{models_dir}`, `{outputs_dir}` in string values."""
    paths = {
        "profile": prof["profile"],
        "data_dir": "data/{profile}",
        "models_dir": "models/{profile}",
        "outputs_dir": "outputs/{profile}",
        **prof.get("paths", {}),
    }
    for _ in range(2):
        paths = {k: (v.format(**paths) if isinstance(v, str) else v) for k, v in paths.items()}
    return {k: (v.format(**paths) if isinstance(v, str) and "{" in v else v) for k, v in values.items()}


def profile_paths(profile: str | os.PathLike) -> dict[str, str]:
    """The `paths` section of a profile with templates filled: data_dir, models_dir, outputs_dir."""
    prof = load_profile(profile)
    return fill_paths({"data_dir": "{data_dir}", "models_dir": "{models_dir}", "outputs_dir": "{outputs_dir}"}, prof)
