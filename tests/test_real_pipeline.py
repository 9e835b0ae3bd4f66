"""Issue 23 point 3 on a real checkpoint, as a user runs it: `tuna train --lora` on SmolLM2-135M-Instruct with the
real-model defaults (its chat template through --template auto, LoRA's learning rate and warm-up, the token
budget), `tuna eval ranking` of the adapter, `tuna merge`, and the merged model loaded and run by plain
transformers (AutoModelForCausalLM.from_pretrained, generate), equal to the base with its adapter."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuna_train.config import REAL_LORA_LEARNING_RATE, REAL_MODEL_BATCH_TOKENS

pytestmark = pytest.mark.real_model

RECORDS = [
    {"instruction": "Name a colour of the sky.", "responses": ["Blue.", "Green, like grass."], "scores": [1.0, 0.0]},
    {"instruction": "What is 2 + 3?", "responses": ["5", "It is 23."], "scores": [1.0, 0.0]},
    {"instruction": "Say hello in French.", "responses": ["Bonjour.", "Hola."], "scores": [1.0, 0.0]},
    {"instruction": "Name a fruit.", "responses": ["An apple.", "A chair."], "scores": [1.0, 0.0]},
]


def tuna(*args):
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_train_lora_eval_merge_and_load_in_plain_transformers(smollm2_dir, tmp_path):
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    run = tmp_path / "run"
    tuna("train", "--model", "smollm2-135m-instruct", "--data", str(data), "--lora", "--lora-r", "4",
         "--max-steps", "2", "--batch-groups", "2", "--eval-fraction", "0", "--max-length", "64",
         "--output-dir", str(run), "--progress", "false", "--tensorboard", "false")
    config = json.loads((run / "config.json").read_text())
    assert config["learning_rate"] == REAL_LORA_LEARNING_RATE and config["max_batch_tokens"] == REAL_MODEL_BATCH_TOKENS
    assert config["template"] == "auto" and config["warmup_steps"] is None  # a tenth of 2 steps: none
    adapter = run / "final"
    assert (adapter / "adapter_config.json").is_file()

    evaluated = tmp_path / "eval"
    tuna("eval", "ranking", "--model", "smollm2-135m-instruct", "--adapter", str(adapter), "--data", str(data),
         "--out", str(evaluated))
    metrics = json.loads((evaluated / "report-ranking.json").read_text())["metrics"]
    assert 0.0 <= metrics["pair_accuracy"] <= 1.0

    merged = tmp_path / "merged"
    tuna("merge", str(adapter), "--out", str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged), local_files_only=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), local_files_only=True)
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
        expected, got = adapted(**ids).logits, model(**ids).logits
    assert out.shape[1] > ids["input_ids"].shape[1]  # it generates
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), float((got - expected).abs().max())
