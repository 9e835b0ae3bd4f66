"""The CLI reference (docs/cli.md), rendered from the parser that `tuna` runs, and the example pipeline file
(configs/pipeline_example.yaml), rendered from PipelineConfig, so that neither can drift from the code.

``python -m tuna_train.cli_reference > docs/cli.md`` and ``python -m tuna_train.cli_reference --pipeline-example >
configs/pipeline_example.yaml`` (both: ``make docs``) rewrite them; tests render them again and compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
from typing import List, Tuple

import yaml

from .cli import build_parser
from .options import choices_of, ordered_fields
from .pipeline.workflow import PipelineConfig

HEADER = """# CLI reference

Every flag of every `tuna` command: its default, its choices and what it does. This page is generated from
the parser that `tuna` runs (`make docs`; a test checks that it is in sync). The `train` flags are the fields
of `tuna_train.config.TrainConfig` and the `pipeline` flags those of `tuna_train.pipeline.workflow.PipelineConfig`:
each one is also a key of the command's YAML file (`--config`).
"""


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}` (positional)"
    return ", ".join(f"`{name}`" for name in action.option_strings)


_HELP_DEFAULT = re.compile(r"\s*\(default: (.*)\)$")


def _help_and_default(action: argparse.Action) -> Tuple[str, str]:
    """The config-built flags (train, pipeline) default to None in the parser, so that a YAML file can set them,
    and state the config's default at the end of their help: that is the default a user gets."""
    text = (action.help or "").replace("%%", "%")  # argparse's escape of a literal %
    match = _HELP_DEFAULT.search(text)
    if action.default is None and match:
        return text[:match.start()], f"`{_cell(match.group(1))}`"
    return text, _default(action)


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default is argparse.SUPPRESS or action.required:
        return ""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    return f"`{_cell(action.default)}`"


def _choices(action: argparse.Action) -> str:
    if not action.choices:
        return ""
    return " \\| ".join(f"`{_cell(choice)}`" for choice in action.choices)


def render(parser: argparse.ArgumentParser = None) -> str:
    parser = parser or build_parser()
    helps = {a.dest: a.help for a in next(a for a in parser._actions
                                           if isinstance(a, argparse._SubParsersAction))._choices_actions}
    parts: List[str] = [HEADER]
    for name, sub in _subcommands(parser).items():
        parts.append(f"\n## `tuna {name}`\n\n{_cell(helps.get(name, ''))}\n\n")
        parts.append("| flag | default | choices | what it does |\n|---|---|---|---|\n")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text, default = _help_and_default(action)
            parts.append(f"| {_flag(action)} | {default} | {_choices(action)} | {_cell(text)} |\n")
    return "".join(parts)


PIPELINE_EXAMPLE_HEADER = """\
# tuna pipeline --config configs/pipeline_example.yaml   (every field, at its default; flags override it)
# Generated from PipelineConfig (make docs). The defaults run the whole method on the built-in tasks on a CPU. For a
# real run, set model (an instruction-tuned start model), data (+ teacher), instructions, judge and the stages' tuna
# train fields (configs/tuna_p_llama7b_qlora.yaml and configs/tuna_c_llama7b_qlora.yaml hold the paper's settings).
"""


def example_config(config_class: type = PipelineConfig, header: str = PIPELINE_EXAMPLE_HEADER) -> str:
    """A YAML file of every field of ``config_class`` at its default, each under its help (and choices)."""
    parts = [header]
    for name, field_ in ordered_fields(config_class).items():
        default = field_.default if field_.default is not dataclasses.MISSING else field_.default_factory()
        text = field_.metadata["help"]
        choices = choices_of(field_)
        if choices and not isinstance(default, list):
            text += f" ({' | '.join(map(str, choices))})"
        parts.append("\n" + textwrap.fill(text, width=118, initial_indent="# ", subsequent_indent="# ") + "\n")
        # a mapping or list default on one line (flow style), under its key
        flow = None if isinstance(default, (dict, list)) else False
        parts.append(yaml.safe_dump({name: default}, default_flow_style=flow, width=118, sort_keys=True))
    return "".join(parts)


if __name__ == "__main__":
    print(example_config() if sys.argv[1:] == ["--pipeline-example"] else render(), end="")
