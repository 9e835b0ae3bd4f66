"""The ``tuna`` command: it only parses arguments and calls the library.

    tuna train [--config FILE.yaml] [--key value ...]     every TrainConfig field is a flag (--lora-r 8)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .config import TrainConfig, config_fields


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named after it; values are converted (and checked) by load_config."""
    for name, field_ in config_fields().items():
        flag = "--" + name.replace("_", "-")
        kind = type(field_.default).__name__ if field_.default is not None else "str"
        if isinstance(field_.default, bool):
            # "--lora" alone means true; "--lora false" is accepted too
            parser.add_argument(flag, dest=name, nargs="?", const="true", default=None, metavar="BOOL",
                                help=f"(bool, default {field_.default})")
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=kind.upper(),
                                help=f"({kind}, default {field_.default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuna", description="Tuna ranking fine-tuning, fused and memory-lean.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train with the Tuna ranking loss (no arguments: the embedded default)",
                                description="Every field of TrainConfig is a flag; a YAML file (--config) sets "
                                            "the same fields. Flags override the file.")
    train.add_argument("--config", dest="config_file", default=None, help="YAML file of TrainConfig fields")
    _add_config_flags(train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = args.pop("command")
    if command == "train":
        from .config import load_config
        from .trainer import NonFiniteLossError, Trainer

        config_file = args.pop("config_file")
        overrides = {key: value for key, value in args.items() if value is not None}
        try:
            config = load_config(config_file, overrides)
            summary = Trainer(config).run()
        except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
            print(f"tuna train: error: {error}", file=sys.stderr)
            return 2
        _print_summary(config, summary)
        return 0 if summary["status"] == "finished" else 3
    parser.error(f"unknown command {command}")
    return 2


def _print_summary(config: TrainConfig, summary: dict) -> None:
    def accuracy(result):
        return "n/a" if not result or result.get("pair_accuracy") is None else f"{result['pair_accuracy']:.3f}"

    print(f"tuna train: {summary['status']} after {summary['steps']}/{summary['total_steps']} steps "
          f"in {summary['train_seconds']:.0f} s; output in {config.output_dir}")
    print(f"held-out pairwise ranking accuracy: before {accuracy(summary.get('initial_eval'))}, "
          f"after {accuracy(summary.get('final_eval'))}")


if __name__ == "__main__":
    sys.exit(main())
