"""`--template auto` (the default): the tokenizer's chat template where it has one, else Alpaca; a template that
cannot apply is refused on the tokenizer alone, before a model loads; responses end at every stop token the
tokenizer and the model's generation config name."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from tuna_train.cli import main
from tuna_train.model import build_tiny_llama, load_tokenizer, stop_token_ids, synthetic_tokenizer
from tuna_train.pipeline.generate import FINISH_LENGTH, FINISH_STOP, decode_with_reasons
from tuna_train.templates import alpaca_prompt, format_prompt, resolve_template


def test_auto_is_alpaca_for_a_tokenizer_without_a_chat_template():
    """The embedded default's tokenizer has none: auto keeps the Alpaca prompt byte for byte (its figures)."""
    tokenizer = synthetic_tokenizer()
    assert resolve_template("auto", tokenizer) == "alpaca" and resolve_template("auto", None) == "alpaca"
    for input_text in (None, "context"):
        assert format_prompt("Add 2 and 3.", input_text, "auto", tokenizer) == alpaca_prompt("Add 2 and 3.", input_text)


@pytest.mark.real_model
def test_auto_is_the_chat_template_of_a_chat_model(smollm2_dir, gemma3_dir):
    for path in (smollm2_dir, gemma3_dir):
        tokenizer = load_tokenizer(str(path))
        expected = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                                 add_generation_prompt=True)
        assert resolve_template("auto", tokenizer) == "chat"
        assert format_prompt("Name a colour.", None, "auto", tokenizer) == expected


@pytest.mark.real_model
def test_gemma_stops_at_end_of_turn_as_its_generation_config_says(gemma3_dir):
    tokenizer = load_tokenizer(str(gemma3_dir))
    model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(gemma3_dir)))
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id,
                                                tokenizer.convert_tokens_to_ids("<end_of_turn>")]


def test_a_stop_token_of_the_generation_config_ends_a_response_and_is_its_finish_reason():
    """A model that always emits token 5, which its generation config lists as a stop token beside the
    tokenizer's EOS (as Gemma's <end_of_turn>): the response stops at once, marked stop, not cut."""
    tokenizer = synthetic_tokenizer()
    model = build_tiny_llama(seed=3).eval()
    bump = torch.zeros(model.config.vocab_size)
    bump[5] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bump)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    [[(text, reason)]] = decode_with_reasons(model, tokenizer, ["Say it."], 1, None, 1.0, max_new_tokens=8)
    assert reason == FINISH_STOP
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # 5 is no stop token: the cap cuts it
    [[(text, reason)]] = decode_with_reasons(model, tokenizer, ["Say it."], 1, None, 1.0, max_new_tokens=8)
    assert reason == FINISH_LENGTH


@pytest.mark.parametrize("command", ["score", "generate", "eval"])
def test_template_chat_without_a_chat_template_is_refused_before_the_model_loads(tmp_path, capsys, command):
    """A directory with a tokenizer that has no chat template and no model at all: the one-line refusal is the
    template's (naming the directory), so it came before any attempt to load weights."""
    model_dir = tmp_path / "no-weights"
    synthetic_tokenizer().save_pretrained(str(model_dir))
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"instruction": "q", "responses": ["a", "b"], "scores": [1.0, 0.0],
                                "output": "a"}) + "\n")
    argv = {"score": ["score", "--teacher", str(model_dir)],
            "generate": ["generate", "--model", str(model_dir)],
            "eval": ["eval", "generation", "--model", str(model_dir)]}[command]
    code = main(argv + ["--data", str(data), "--out", str(tmp_path / "out"), "--template", "chat"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert f"{model_dir}: template 'chat' needs a tokenizer with a chat template" in error[0], error
    assert not (tmp_path / "out").exists()
