"""Adapters across stages: Tuna_c trained from Tuna_p's LoRA adapter starts where Tuna_p ended (the adapter is
continued, not re-initialised), with LoRA, with QLoRA, and through `tuna merge`."""

import json
import subprocess
import sys

import pytest
import torch

from tuna_train.build import build_model
from tuna_train.config import load_config
from tuna_train.model import adapter_base_path, load_model
from tuna_train.trainer import Trainer

RUN = dict(synthetic_examples=240, batch_groups=4, eval_groups=16, progress=False, tensorboard=False, eval_every=0,
           log_every=1, max_steps=4, save_every=100, warmup_steps=0, learning_rate=1e-2, lr_schedule="constant",
           lora_r=4, lora_dropout=0.0)
EVAL_KEYS = ("pair_accuracy", "score_gap", "mle_loss")


def train(output_dir, **overrides):
    return Trainer(load_config(None, dict(RUN, output_dir=str(output_dir), **overrides))).run()


def assert_same_eval(first, last):
    for key in EVAL_KEYS:
        assert first[key] == pytest.approx(last[key], rel=1e-6, abs=1e-6), (key, first, last)


def lora_b_norm(model):
    return sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.slow
@pytest.mark.parametrize("quantised", [False, True], ids=["lora", "qlora"])
def test_tuna_c_continues_the_tuna_p_adapter(tmp_path, tiny_model_dir, quantised):
    options = dict(model=str(tiny_model_dir), lora=True)
    if quantised:
        options.update(load_in_4bit=True, bnb_compute_dtype="float32")
    tuna_p = train(tmp_path / "tuna_p", **options)
    adapter = tmp_path / "tuna_p" / "final"
    assert adapter_base_path(str(adapter)) == str(tiny_model_dir)

    config = load_config(None, dict(RUN, output_dir=str(tmp_path / "tuna_c"), **dict(options, model=str(adapter))))
    model, _ = build_model(config)
    assert lora_b_norm(model) > 0, "the adapter was re-initialised (lora_B is zero)"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}, "one adapter, trainable; the base frozen"

    tuna_c = train(tmp_path / "tuna_c", **dict(options, model=str(adapter)))
    assert_same_eval(tuna_c["initial_eval"], tuna_p["final_eval"])
    assert tuna_c["final_eval"]["mle_loss"] != tuna_c["initial_eval"]["mle_loss"]  # and it trains on


@pytest.mark.slow
def test_tuna_merge_writes_a_model_that_starts_where_tuna_p_ended(tmp_path, tiny_model_dir):
    tuna_p = train(tmp_path / "tuna_p", model=str(tiny_model_dir), lora=True)
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "merge", str(tmp_path / "tuna_p" / "final"),
                           "--out", str(merged)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()
    assert (merged / "tokenizer_config.json").exists() and adapter_base_path(str(merged)) is None
    plain = load_model(str(merged))
    assert not any("lora_" in n for n, _ in plain.named_parameters())

    tuna_c = train(tmp_path / "tuna_c", model=str(merged))  # full fine-tuning of the merged model
    assert_same_eval(tuna_c["initial_eval"], tuna_p["final_eval"])
    stacked = train(tmp_path / "stacked", model=str(tmp_path / "tuna_p" / "final"), adapter="merge", lora=True)
    assert_same_eval(stacked["initial_eval"], tuna_p["final_eval"])  # merged in memory, a new adapter on top


def test_an_adapter_without_lora_or_merge_is_refused(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(adapter))
    json.loads((adapter / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="--lora.*--adapter merge"):
        build_model(load_config(None, dict(model=str(adapter))))
    with pytest.raises(ValueError, match="tuna merge"):
        load_model(str(adapter), load_in_4bit=True, adapter="merge")
    merged = load_model(str(adapter), adapter="merge")
    assert isinstance(merged, torch.nn.Module) and not hasattr(merged, "peft_config")
