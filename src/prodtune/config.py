"""The one config loader: profiles in `configs/`, one section per stage, dataclasses per stage.

    python -c "from prodtune.config import load_config; from prodtune.data import Config; print(load_config(Config, 'cpu'))"

Each stage module defines a dataclass (`DataConfig`, `CoTConfig`, `TrainConfig`, `RagConfig`, `EvalConfig`) with a
`SECTION` class attribute naming its YAML section and a `help` text on every field (the CLI's flags and help are made
from them). A profile (`configs/<name>.yaml`) states only what differs from the dataclass defaults, may `inherit:`
another profile, and may not name a key the dataclass does not have. Layers, later ones winning:

1. the dataclass defaults;
2. each profile of the `inherit:` chain, the root first; within a layer, a track's sub-mapping (`train.deepseek:`)
   beats the layer's shared keys, and a layer's shared keys beat older layers' per-track values (so `h100.yaml`'s
   batch size reaches both tracks even where `cpu.yaml` gave a track its own);
3. a named recipe of the profile (`recipes.study.train.loss_on: all`): the same stages run another way;
4. `section.key=value` overrides (`--set` on the command line, `OVERRIDES` in notebooks);
5. explicit values (command-line flags, notebook parameters).

Path templates (`{data_dir}`, `{models_dir}`, `{outputs_dir}`, `{profile}`, `{track}`) are filled from the profile's
`paths` section; with `PRODTUNE_HOME` set, relative folders live under it (a Drive folder on Colab). Every mistake
raises `ConfigError` naming the file, section and key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from prodtune.io import at_home, project_root

T = TypeVar("T")

SECTIONS = ("paths", "data", "cot", "train", "rag", "evaluate", "pipeline", "recipes")
STAGE_SECTIONS = ("data", "cot", "train", "rag", "evaluate")
DEFAULT_PATHS = {"data_dir": "data/{profile}", "models_dir": "models/{profile}", "outputs_dir": "outputs/{profile}"}


class ConfigError(ValueError):
    """A profile, override or value names an unknown key, a value of the wrong type or one out of range."""


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------


def configs_dirs() -> list[Path]:
    """Folders searched for profiles: `$PRODTUNE_CONFIGS`, the project's `configs/`, the copy shipped in the package."""
    dirs = [Path(p) for p in os.environ.get("PRODTUNE_CONFIGS", "").split(os.pathsep) if p]
    dirs += [project_root() / "configs", Path(__file__).resolve().parent / "configs"]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.append(d.resolve())
    return seen


def known_profiles() -> list[str]:
    """Names of the profiles found (`cpu`, `colab-t4`, ...)."""
    return sorted({p.stem for d in configs_dirs() for p in d.glob("*.yaml")})


def profile_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a profile name (`cpu`) or a YAML path (`configs/cpu.yaml`, `/abs/mine.yaml`) to an existing file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        cands = [p, project_root() / p]
    else:
        cands = [d / f"{name_or_path}.yaml" for d in configs_dirs()]
    for c in cands:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"profile {str(name_or_path)!r} not found (looked at {', '.join(map(str, cands)) or 'no configs folder'}); "
                      f"known: {', '.join(known_profiles())}; --profile also takes a path to a YAML file")


def profile_layers(name_or_path: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """The profile and every profile it inherits from, the root first, each as (path, sections)."""
    layers: list[tuple[Path, dict[str, Any]]] = []
    path: Path | None = profile_path(name_or_path)
    while path is not None:
        if any(path == p for p, _ in layers):
            raise ConfigError(f"{path}: `inherit:` makes a loop")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a profile must be a mapping of sections")
        parent = raw.pop("inherit", None)
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; sections are {list(SECTIONS)}")
        for sec, body in raw.items():
            if body is not None and not isinstance(body, dict):
                raise ConfigError(f"{path}: section {sec!r} must be a mapping")
        layers.insert(0, (path, {k: v or {} for k, v in raw.items()}))
        path = profile_path(parent) if parent else None
    return layers


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """All sections of a profile merged along its `inherit:` chain, overrides applied; `profile` holds its name."""
    return _merged(profile_layers(name_or_path), overrides)


def _merged(layers: list[tuple[Path, dict[str, Any]]], overrides: Sequence[str] = ()) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for _, raw in layers:
        merged = _merge(merged, raw)
    merged = _merge(merged, parse_overrides(overrides))
    for sec in SECTIONS:
        merged.setdefault(sec, {})
    merged["profile"] = layers[-1][0].stem
    return merged


def parse_overrides(items: Sequence[str]) -> dict[str, dict]:
    """`["train.max_steps=20", "train.llama.max_steps=3", "data.sample=null"]` -> nested sections (values as YAML)."""
    out: dict[str, dict] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        parts = key.strip().lstrip("-").split(".")
        if not sep or len(parts) < 2 or parts[0] not in SECTIONS or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value (or section.track.key=value) "
                              f"with section in {list(STAGE_SECTIONS)}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        node = out.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    return out


def paths_of(prof: dict[str, Any], **extra: str) -> dict[str, str]:
    """The profile's `paths` with templates filled: data_dir, models_dir, outputs_dir, profile (+ extra, e.g. track).

    Relative folders are relative to the project root, or to `$PRODTUNE_HOME` when it is set (`io.at_home`).
    """
    paths = {"profile": prof["profile"], **DEFAULT_PATHS, **(prof.get("paths") or {}), **extra}
    for _ in range(3):
        paths = {k: _fill(v, paths, "paths." + k) if isinstance(v, str) else v for k, v in paths.items()}
    # with PRODTUNE_HOME set, the three folders (and every path made from them) live under it
    return {k: at_home(v) if k in DEFAULT_PATHS and isinstance(v, str) else v for k, v in paths.items()}


def _fill(value: str, paths: dict[str, Any], where: str) -> str:
    try:
        return value.format(**paths) if "{" in value else value
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where}: cannot fill the template {value!r} ({e}); known: "
                          f"{', '.join('{' + k + '}' for k in paths)}") from None


# ----------------------------------------------------------------------------------------------
# Stage configs
# ----------------------------------------------------------------------------------------------


def tracks_of(cls: type) -> tuple[str, ...]:
    """The tracks a stage dataclass has per-track sub-sections for (`TRACKS` class attribute), or ()."""
    return tuple(getattr(cls, "TRACKS", ()) or ())


def load_config(cls: type[T], profile: str | os.PathLike = "cpu", overrides: Sequence[str] = (), *,
                recipe: str | None = None, track: str | None = None, **values: Any) -> T:
    """Build a stage's dataclass from a profile (see the module docstring for the layers).

    Args:
        cls: the stage dataclass; its `SECTION` names the YAML section.
        profile: profile name or YAML path.
        overrides: `section.key=value` strings (other sections are checked for syntax and ignored).
        recipe: a name under the profile's `recipes:` (e.g. `study`), applied over the profile.
        track: for stages with tracks (`TRACKS`), which one (`llama` / `deepseek`); default: the dataclass's.
        **values: explicit field values (None values are ignored), the last layer.

    Raises:
        ConfigError: unknown profile, section, key, track or recipe; a value of the wrong type or out of range.
    """
    section = getattr(cls, "SECTION", None)
    if section not in STAGE_SECTIONS:
        raise ConfigError(f"{cls.__name__} has no SECTION in {STAGE_SECTIONS}")
    files = profile_layers(profile)  # read once: the merged profile and the layers come from the same files
    prof = _merged(files)
    layers = [raw for _, raw in files]
    if recipe:
        recipes = prof.get("recipes") or {}
        if recipe not in recipes:
            raise ConfigError(f"recipe {recipe!r} not in profile {prof['profile']!r}; known: {sorted(recipes)}")
        layers.append(recipes[recipe] or {})
    layers.append(parse_overrides(overrides))
    layers.append({section: {k: v for k, v in values.items() if v is not None}})

    tracks = tracks_of(cls)
    if track is None and tracks:  # a recipe or an override may name the track
        for layer in layers:
            track = (layer.get(section) or {}).get("track", track)
    if track is not None and tracks and track not in tracks:
        raise ConfigError(f"{cls.__name__}: unknown track {track!r}; tracks are {list(tracks)}")
    if track is None and tracks:
        track = next(f.default for f in dataclasses.fields(cls) if f.name == "track")

    flat: dict[str, Any] = {}
    for layer in layers:
        body = layer.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        flat.update({k: v for k, v in body.items() if k not in tracks})
        if track is not None:
            sub = body.get(track) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{section}.{track} must be a mapping of {cls.__name__} keys")
            flat.update(sub)
    if track is not None:
        flat["track"] = track

    paths = paths_of(prof, **({"track": track} if track else {}))
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if isinstance(f.default, str) and "{" in f.default}
    filled = {k: _fill(v, paths, f"{section}.{k}") if isinstance(v, str) else v for k, v in {**defaults, **flat}.items()}
    return build(cls, filled)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _check_type(cls_name: str, name: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        if tp is type(None) or (_is_union(tp) and type(None) in args) or tp is Any:
            return None
        raise ConfigError(f"{cls_name}.{name}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if tp is Any:
        return value
    if _is_union(tp):
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{cls_name}.{name}: {value!r} is not {tp}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name}: expected a list, got {value!r}")
        return [_check_type(cls_name, name, v, args[0]) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{cls_name}.{name}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    if tp is str and isinstance(value, bool):  # YAML reads true/false/yes/no as booleans
        return str(value).lower()
    if tp in (int, float, str, bool):
        if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
            raise ConfigError(f"{cls_name}.{name}: {value!r} is not {tp.__name__}")
    return value


def build(cls: type[T], values: dict[str, Any] | None = None) -> T:
    """Build the dataclass `cls` from plain values, rejecting unknown keys and wrong types (ConfigError)."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    checked = {k: _check_type(cls.__name__, k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ that still raises a bare error
        raise ConfigError(f"{cls.__name__}: {e}") from None


def describe(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass, for run cards and logs."""
    return dataclasses.asdict(cfg)


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text (what the CLI shows)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
