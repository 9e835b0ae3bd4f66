"""Every option is declared once (tuna_train.options): the command line, the YAML files and the Trainer arguments
are read from the configuration dataclasses, and a shared option is never written again elsewhere."""

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from tuna_train import options
from tuna_train.cli import COMMANDS, build_parser, parse_config
from tuna_train.config import TrainConfig, load_config
from tuna_train.hf_trainer import TunaTrainingArguments
from tuna_train.options import GroupOptions, LossOptions, choices_of

ROOT = Path(__file__).resolve().parents[1]
#: the option groups: dataclasses of options.py whose fields other configurations take
GROUPS = [value for value in vars(options).values()
          if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == options.__name__]
#: a field name that means another option in a configuration without the group: (group, field) -> the classes
OTHER_MEANINGS = {
    ("LossOptions", "temperature"): {"GenerateConfig", "PipelineConfig"},  # sampling's, not listmle's
    ("SamplingOptions", "temperature"): {"TrainConfig", "TunaTrainingArguments"},  # listmle's, not sampling's
    ("PlacementOptions", "load_in_4bit"): {"TrainConfig"},  # the trained base's QLoRA quantisation
    ("PlacementOptions", "dtype"): {"MergeConfig"},  # the merged weights' dtype (no auto)
}


def subparsers():
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def configurations():
    return [command.config_class for command in COMMANDS.values()] + [TunaTrainingArguments]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_is_a_field_with_its_help_choices_and_bound(name):
    config_class, sub = COMMANDS[name].config_class, subparsers()[name]
    actions = {action.dest: action for action in sub._actions if not isinstance(action, argparse._HelpAction)}
    actions.pop("config_file", None)  # --config FILE.yaml of train and pipeline
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    assert set(actions) == set(fields)
    for field_name, field_ in fields.items():
        action = actions[field_name]
        assert action.help.replace("%%", "%").startswith(field_.metadata["help"]), field_name
        if not isinstance(field_.default, bool) and not isinstance(action.default, list):
            assert action.choices == choices_of(field_) or (action.choices is None and isinstance(
                field_.default_factory() if field_.default is dataclasses.MISSING else field_.default, list))
        bound = field_.metadata.get("type")
        if bound is not None and field_.default is not None:
            assert action.type is bound, field_name  # the command line refuses what validate() refuses
        assert action.default is None or action.option_strings == []  # unset flags leave the config's default


def test_a_shared_option_is_declared_once():
    """A field of an option group keeps the group's declaration (its help, choices, bound) in every
    configuration that has it, whether mixed in or taken alone (options.field_of)."""
    for config_class in configurations():
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        for group in GROUPS:
            for declared in dataclasses.fields(group):
                here = fields.get(declared.name)
                if here is None or config_class.__name__ in OTHER_MEANINGS.get((group.__name__, declared.name), ()):
                    continue
                assert dict(here.metadata) == dict(declared.metadata), (config_class.__name__, declared.name)


def test_no_option_is_written_twice_in_the_source():
    """Each option() call of the product has a help text of its own: a copied declaration (an option written
    again, whatever its name) is caught in the source, where it would drift."""
    helps = {}
    for path in sorted(ROOT.glob("tuna_train/**/*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option" and len(node.args) > 1:
                text = ast.get_source_segment(source, node.args[1])
                helps.setdefault(" ".join(text.split()), []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(helps) > 100
    assert {text: places for text, places in helps.items() if len(places) > 1} == {}


def test_the_trainer_arguments_are_tuna_trains_loss_and_group_options():
    train, hf = ({f.name: f for f in dataclasses.fields(cls)} for cls in (TrainConfig, TunaTrainingArguments))
    parser = HfArgumentParser(TunaTrainingArguments)
    flags = {action.dest: action for action in parser._actions}
    for group in (LossOptions, GroupOptions):
        for declared in dataclasses.fields(group):
            name = declared.name
            assert hf[name].default == train[name].default == declared.default, name
            assert dict(hf[name].metadata) == dict(train[name].metadata) == dict(declared.metadata), name
            assert flags[name].help == declared.metadata["help"]
            assert tuple(flags[name].choices or ()) == tuple(choices_of(declared) or ()), name
    args = TunaTrainingArguments(output_dir="/tmp/unused", loss="listmle", temperature=0.5, grad_filter_eps=2 ** -8,
                                 report_to=[])
    loss = args.tuna_loss()  # the loss options reach TunaLoss in one call, every one of them
    assert (loss.loss, loss.options.temperature, loss.logprob_options["grad_filter_eps"]) == ("listmle", 0.5, 2 ** -8)


@pytest.mark.parametrize("source, words", [
    ({"timeout": "0"}, "config field 'timeout' must be > 0, got 0.0"),
    ({"concurrency": "0"}, "config field 'concurrency' must be >= 1, got 0"),
    ({"device": "tpu"}, "config field 'device' must be one of"),
    ({"num_candidates": "0"}, "config field 'num_candidates' must be >= 1, got 0"),
])
def test_yaml_and_code_refuse_what_the_command_line_refuses(tmp_path, source, words):
    from tuna_train.pipeline.workflow import PipelineConfig

    path = tmp_path / "pipeline.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in source.items()))
    with pytest.raises(ValueError, match=words):
        load_config(str(path), config_class=PipelineConfig)
    with pytest.raises(ValueError, match=words.split(", got")[0]):
        PipelineConfig(**{key: type(getattr(PipelineConfig(), key))(value) for key, value in source.items()}).validate()


def test_a_command_line_is_its_configuration():
    name, config = parse_config(["generate", "--model", "m", "--data", "d", "--out", "o", "-k", "3", "--top-p",
                                 "0.9", "--load-in-4bit"])
    assert name == "generate" and (config.num_candidates, config.top_p, config.load_in_4bit) == (3, 0.9, True)
    assert config.max_new_tokens == options.SamplingOptions.max_new_tokens
    _, evaluation = parse_config(["eval", "ranking", "--model", "m", "--data", "d"])
    assert (evaluation.kind, evaluation.max_new_tokens, evaluation.batch_size) == ("ranking", 128, 16)
    with pytest.raises(ValueError, match="config field 'teacher' is required"):
        COMMANDS["score"].config_class(data="d", out="o").validate()
