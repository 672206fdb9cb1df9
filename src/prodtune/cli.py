"""`prodtune <command>`: one sub-command per stage, its flags made from the stage's dataclass.

    prodtune prepare --input data/sample/trn_sample.jsonl --sample 200
    prodtune train --track deepseek --profile cpu --set train.max_steps=20
    prodtune train --recipe study                     # the study's recipe (profile's recipes.study)
    prodtune run                                      # the whole pipeline (what run_all.sh does)

Every stage command takes `--profile NAME|PATH`, `--set SECTION.KEY=VALUE` (repeatable), `--recipe NAME` and
`--debug`, then one flag per field of the stage's dataclass (`prodtune prepare --help` lists them with their help
and the profile's values as defaults). Values come from, later ones winning: the dataclass defaults, the profile,
the recipe, `--set`, the flags. Errors a user can fix print one line on stderr and exit with code 2; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from typing import Any

# Stage commands, in pipeline order: command -> (module, notebook, what it does).
STAGES = {
    "prepare": ("prodtune.data", "01", "clean, filter, sample and split trn.json"),
    "cot": ("prodtune.cot", "02", "generate the chain-of-thought Q&A dataset"),
    "train": ("prodtune.train", "03/04", "LoRA fine-tune a track (llama | deepseek)"),
    "rag": ("prodtune.rag", "05", "build and evaluate the Chroma store"),
    "evaluate": ("prodtune.evaluate", "06", "generate, score and compare every system; write the report"),
}
OTHER = {"run": ("prodtune.pipeline", "run the notebooks 01..06 with papermill (what run_all.sh does)"),
         "generate": ("prodtune.assistant", "ask a trained run once"), "chat": ("prodtune.chat", "a terminal loop over a trained run"), "export": ("prodtune.export", "merged 16-bit or GGUF (+ Ollama Modelfile) of a trained run"),
         "push": ("prodtune.hub", "upload a trained run (adapter, merged, GGUF) to the Hugging Face Hub with a model card"),
         "serve": ("prodtune.serve", "the sales assistant's web page (describe a product, ask a question)")}
EXAMPLES = """examples:
  prodtune prepare --input trn.json.gz --uid_from_text true --profile colab-t4
  prodtune train --track llama --max_steps 20
  prodtune train --profile configs/my.yaml --set train.llama.learning_rate=5e-4
  prodtune evaluate --n_test 20
  prodtune run --profile smoke"""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user can act on: one line on stderr, exit code 2."""
    from prodtune.config import ConfigError
    from prodtune.io import InputError, UserError

    return (UserError, ConfigError, InputError, FileNotFoundError, NotADirectoryError, PermissionError)


def _epilog() -> str:
    from prodtune.config import known_profiles
    from prodtune.evaluate import SYSTEMS

    return (f"profiles: {', '.join(known_profiles()) or '(none found)'} (or a YAML path)\n"
            f"tracks: llama, deepseek; recipes: study\nsystems (stage 06): {', '.join(SYSTEMS)}\n\n{EXAMPLES}")


def _top_parser() -> argparse.ArgumentParser:
    epilog = _epilog() + "\n\n`prodtune <command> --help` lists a command's flags."
    p = argparse.ArgumentParser(prog="prodtune", description=(__doc__ or "").splitlines()[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, nb, what) in STAGES.items():
        sub.add_parser(name, help=f"stage {nb}: {what}", add_help=False)
    for name, (_, what) in OTHER.items():
        sub.add_parser(name, help=what, add_help=False)
    return p


COMMON_FLAGS = ("profile", "set", "recipe", "debug")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text (the profile's values), the epilog's line breaks kept."""


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("profile")
    g.add_argument("--profile", default="cpu", help="profile name (see `prodtune --help`) or a YAML path (default: cpu)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value (repeatable)")
    g.add_argument("--recipe", default=None, help="a recipe of the profile, e.g. study (the study's cleaner + loss on all tokens)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def stage_parser(command: str, defaults: Any | None = None) -> argparse.ArgumentParser:
    """The parser of a stage command: the common flags plus one per dataclass field (HfArgumentParser)."""
    from transformers import HfArgumentParser

    module, nb, what = STAGES[command]
    mod = importlib.import_module(module)
    clash = {f.name for f in dataclasses.fields(mod.Config)} & set(COMMON_FLAGS)
    if clash:  # a programming error: the field would shadow a common flag
        raise TypeError(f"{mod.Config.__name__}: field(s) {sorted(clash)} clash with the common flags {COMMON_FLAGS}")
    parser = HfArgumentParser(mod.Config, prog=f"prodtune {command}", description=f"stage {nb}: {what}",
                              epilog=_epilog(), formatter_class=_Formatter)
    _common(parser)
    if defaults is not None:
        parser.set_defaults(**dataclasses.asdict(defaults))
    return parser


def _loads_through_unsloth(command: str, cfg: Any) -> bool:
    """Whether a stage may load a model through unsloth: training on CUDA with backend auto/unsloth, and the stages
    that load for inference (cot's local backend, evaluate), which use unsloth where it imports."""
    if command == "train":
        return getattr(cfg, "backend", "auto") in ("auto", "unsloth") and getattr(cfg, "device", "auto") != "cpu"
    return command in ("cot", "evaluate")


def run_stage(command: str, argv: list[str]) -> dict[str, Any]:
    """Parse a stage's arguments, load its config through the one loader, run it, return its result."""
    from prodtune.config import load_config, tracks_of
    from prodtune.io import project_root

    module = STAGES[command][0]
    mod = importlib.import_module(module)
    pre = _common(argparse.ArgumentParser(add_help=False))
    if tracks_of(mod.Config):
        pre.add_argument("--track", default=None)
    known, _ = pre.parse_known_args(argv)
    track = getattr(known, "track", None)
    base = load_config(mod.Config, known.profile, known.set, recipe=known.recipe, track=track)
    if _loads_through_unsloth(command, base):
        from prodtune.gpu import preload_unsloth

        preload_unsloth()  # before HfArgumentParser imports transformers: unsloth patches it on import (no-op on CPU)
    parser = stage_parser(command, base)
    ns = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(mod.Config)]
    given = {k: getattr(ns, k) for k in names if getattr(ns, k) != getattr(base, k)}
    # A path typed on the command line is relative to where the user is; the profile's paths to the project root.
    given = {k: (os.path.abspath(v) if _is_path(k) and isinstance(v, str) and v and not os.path.isabs(v)
                 and "://" not in v else v)  # an http(s) URL (stage 01's --input) stays as it is
             for k, v in given.items()}
    if command == "cot" and given.get("base_url") and "backend" not in given:
        from prodtune.cot import pick_backend

        given["backend"] = pick_backend(None, given["base_url"])  # a server's URL means the openai backend
    cfg = load_config(mod.Config, known.profile, known.set, recipe=known.recipe, track=track, **given) if given else base
    os.chdir(project_root())
    return mod.run(cfg)


def _is_path(name: str) -> bool:
    return name == "input" or name.endswith(("_dir", "_path", "_file"))


def _print_result(result: Any) -> None:
    if not isinstance(result, dict):
        return
    text = json.dumps(result, default=str)
    if len(text) > 4000:  # large results (per-row tables): the top-level numbers and paths only
        text = json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}, default=str)
    print(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prodtune` command."""
    from prodtune.io import setup_logging

    setup_logging()
    raw = list(sys.argv[1:] if argv is None else argv)
    if not raw or raw[0] in ("-h", "--help") or raw[0] not in {**STAGES, **OTHER}:
        parser = _top_parser()
        if raw and raw[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"prodtune: error: unknown command {raw[0]!r}; commands: {', '.join([*STAGES, *OTHER])}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if raw else 2
    command, rest = raw[0], raw[1:]
    debug = "--debug" in rest
    try:
        if command in STAGES:
            result = run_stage(command, rest)
            _print_result(result)
            if isinstance(result, dict) and result.get("complete") is False:  # e.g. CoT rows left for a rerun
                print(f"prodtune {command}: not complete; run the same command again to finish", file=sys.stderr)
                return 3
            return 0
        mod = importlib.import_module(OTHER[command][0])
        return int(mod.main(rest) or 0)
    except KeyboardInterrupt as e:  # train's TrainingInterrupted says which checkpoint it saved and how to resume
        if debug:
            raise
        said = " ".join(str(e).split())
        print(f"prodtune {command}: {said or 'interrupted; run the same command again to resume where it stopped'}",
              file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"prodtune {command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
