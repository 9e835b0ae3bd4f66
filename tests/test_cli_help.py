"""Every flag of every `tuna` command says what it does; the train flags' choices come from the config."""

import argparse

import pytest

from tuna_train.cli import build_parser
from tuna_train.config import config_fields
from tuna_train.options import choices_of


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_flag_has_help(command):
    undocumented = [action.option_strings or action.dest for action in subcommands()[command]._actions
                    if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert not undocumented, f"tuna {command}: flags without help: {undocumented}"


def test_train_flags_carry_the_config_choices():
    train = {action.dest: action for action in subcommands()["train"]._actions}
    for name, field_ in config_fields().items():
        assert field_.metadata["help"], name
        assert train[name].choices == choices_of(field_), name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--packing", "sideways"])
