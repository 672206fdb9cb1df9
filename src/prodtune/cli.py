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


def make_parser() -> argparse.ArgumentParser:
    """Build the top-level parser from every stage module's `add_parser(subparsers)`."""
    parser = argparse.ArgumentParser(prog="prodtune", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", default="cpu", help="profile name in configs/ or a YAML path (default: cpu)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_MODULES:
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
    args = make_parser().parse_args(argv)
    from prodtune.config import ConfigError
    from prodtune.data import InputError

    try:
        return int(args.func(args) or 0)
    except (InputError, ConfigError, FileNotFoundError) as e:
        print(f"prodtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
