"""Config: the dataclass defaults validate; YAML and --key value flags map onto fields one to one."""

import dataclasses

import pytest

from tuna_train.cli import build_parser, main
from tuna_train.config import TrainConfig, load_config
from tuna_train.pipeline.workflow import PipelineConfig


def test_every_field_is_a_flag_and_a_yaml_key(tmp_path):
    parser = build_parser()
    flags = {action.dest for action in parser._subparsers._group_actions[0].choices["train"]._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= flags
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lora: true\nlora_r: 4\nlearning_rate: 1.0e-4\nmodel: /some/where\ndata: null\n")
    config = load_config(str(yaml_file), {"lora_r": "8", "mle_on": "best"})
    assert config.lora is True and config.lora_r == 8 and config.learning_rate == 1e-4
    assert config.model == "/some/where" and config.data is None and config.mle_on == "best"


def test_defaults_run_and_validate():
    config = TrainConfig().validate()
    assert config.model is None and config.data is None  # the embedded default


@pytest.mark.parametrize("text, words", [
    ("lora_rank: 4\n", "unknown config field 'lora_rank'"),
    ("lora_r: four\n", "field 'lora_r' expects int"),
    ("mle_on: some\n", "field 'mle_on' must be one of"),
    ("- a list\n", "expected a mapping"),
    ("load_in_4bit: true\nmodel: /m\n", "needs 'lora'"),
])
def test_bad_config_names_the_field(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(str(path))
    assert words in str(info.value)
    assert str(info.value).startswith(str(path))


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["configs/tuna_p_llama7b_qlora.yaml", "configs/tuna_c_llama7b_qlora.yaml"])
def test_shipped_configs_load(path):
    from pathlib import Path

    config = load_config(str(Path(__file__).parent.parent / path))
    assert config.load_in_4bit and config.lora and config.loss == "tuna_margin"


def test_pipeline_template_auto_follows_the_start_model():
    assert PipelineConfig().prompt_template == "none"  # the pipeline's own tiny Llama, trained from scratch
    # a start model of its own: its chat template where its tokenizer has one, else alpaca (resolved per stage)
    assert PipelineConfig(model="runs/alpaca-7b").prompt_template == "auto"
    assert PipelineConfig(template="chat").prompt_template == "chat"
