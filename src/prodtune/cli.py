"""`prodtune <stage>`: one sub-command per stage, each registered by its module's `add_parser`.

    prodtune prepare --input data/sample/trn_sample.jsonl --out data/cpu/prepared
    prodtune train --track llama --profile cpu --set train.max_steps=20
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prodtune.io import setup_logging

# Stage modules, in pipeline order. A module that is not there yet is skipped.
STAGE_MODULES = ("prodtune.data", "prodtune.cot", "prodtune.train", "prodtune.rag", "prodtune.evaluate", "prodtune.pipeline")
# The sub-command each module registers: `prodtune train ...` imports only prodtune.train (fast start, and a machine
# that lacks another stage's dependencies can still train).
COMMANDS = {"prepare": "prodtune.data", "cot": "prodtune.cot", "train": "prodtune.train", "rag": "prodtune.rag",
            "evaluate": "prodtune.evaluate", "run": "prodtune.pipeline"}


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser from the stage modules' `add_parser(subparsers)` (only `command`'s when given)."""
    parser = argparse.ArgumentParser(prog="prodtune", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", default="cpu", help="profile name in configs/ or a YAML path (default: cpu)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value")
    sub = parser.add_subparsers(dest="command", required=True)
    names = [COMMANDS[command]] if command in COMMANDS else STAGE_MODULES
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.add_parser(_WithParents(sub, common))
    return parser


class _WithParents:
    """Wraps argparse sub-parsers so every stage gets `--profile` and `--set`."""

    def __init__(self, sub: argparse._SubParsersAction, common: argparse.ArgumentParser):
        self._sub, self._common = sub, common

    def add_parser(self, name: str, **kw):  # noqa: ANN201
        kw.setdefault("parents", []).append(self._common)
        return self._sub.add_parser(name, **kw)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prodtune` command."""
    setup_logging()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = make_parser(raw[0] if raw else None).parse_args(raw)
    args.argv = raw[raw.index(args.command) + 1 :]  # the stage's own arguments (a stage may re-launch itself)
    from prodtune.config import ConfigError
    from prodtune.io import InputError

    try:
        return int(args.func(args) or 0)
    except (InputError, ConfigError, FileNotFoundError) as e:
        print(f"prodtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
