"""The training loop end to end on a tiny Llama, on CPU: exact resume (graceful stop and kill),
QLoRA, two processes, non-finite losses, and no [tokens x vocab] logits."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuna_hf.model import FusedCausalLM, TargetHiddenStates, lm_head_spec
from tuna_kernels.devtools.memory import AllocationTracker
from tuna_train.config import load_config
from tuna_train.step import NonFiniteLossError
from tuna_train.trainer import Trainer

SMALL = dict(synthetic_examples=400, batch_groups=4, tiny_hidden_size=32, eval_groups=16, progress=False,
             tensorboard=False, eval_every=0, log_every=1)


def small_config(tmp_path, **overrides):
    return load_config(None, dict(SMALL, output_dir=str(tmp_path), **overrides))


def flags(**values):
    return [arg for key, value in values.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def cli(output_dir, **overrides):
    return [sys.executable, "-m", "tuna_train.cli", "train", *flags(**dict(SMALL, output_dir=output_dir, **overrides))]


def train_records(output_dir):
    keep = ("loss", "rank_loss", "mle_loss", "pair_accuracy", "lr", "grad_norm")
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], {k: r.get(k) for k in keep}) for r in records if r["split"] == "train"]


def final_weights(output_dir):
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def wait_for_checkpoint(output_dir, process, timeout=120):
    latest = Path(output_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while not latest.exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_resume_gives_the_same_weights_and_metrics(tmp_path, how):
    run = dict(max_steps=30, save_every=5, tiny_hidden_size=64, batch_groups=8, synthetic_examples=600)
    straight = tmp_path / "straight"
    subprocess.run(cli(str(straight), **run), check=True, capture_output=True)

    broken = tmp_path / "broken"
    process = subprocess.Popen(cli(str(broken), **run), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_checkpoint(broken, process)
    process.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    process.communicate(timeout=120)
    if how == "sigkill":
        assert process.returncode == -signal.SIGKILL
        assert not (broken / "summary.json").exists()
    else:
        assert process.returncode == 3  # stopped early, after a checkpoint of the current step
        assert json.loads((broken / "summary.json").read_text())["status"] == "interrupted"
    stopped_at = int((broken / "checkpoints" / "latest").read_text().split("-")[1])
    assert stopped_at < 30, "the run must have been stopped midway for the test to mean anything"

    subprocess.run(cli(str(broken), **run), check=True, capture_output=True)
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 30
    expected, resumed = final_weights(straight), final_weights(broken)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.allclose(resumed[name], expected[name], rtol=1e-6, atol=1e-7), name
    assert train_records(broken) == train_records(straight)
    assert summary["final_eval"] == json.loads((straight / "summary.json").read_text())["final_eval"]


@pytest.mark.slow
def test_qlora_trains_saves_and_reloads(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from tuna_train.model import build_tiny_llama, load_model, synthetic_tokenizer

    base_dir = tmp_path / "base"
    build_tiny_llama(hidden_size=64, seed=3).save_pretrained(str(base_dir))
    synthetic_tokenizer().save_pretrained(str(base_dir))
    config = small_config(tmp_path / "run", model=str(base_dir), load_in_4bit=True, lora=True, lora_r=8,
                          optimizer="paged_adamw_8bit", bnb_compute_dtype="float32", learning_rate=1e-2,
                          warmup_steps=0, max_steps=12, save_every=6, lr_schedule="constant")
    trainer = Trainer(config)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    summary = trainer.run()
    assert summary["final_eval"]["mle_loss"] < summary["initial_eval"]["mle_loss"]  # the loss falls

    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(load_model(str(base_dir), load_in_4bit=True, compute_dtype="float32"),
                                         str(final))
    batch = trainer.make_batch(trainer.data.eval[:4])
    with torch.no_grad():
        trained_loss, _ = trainer.wrapped.eval()(batch)
        hidden = TargetHiddenStates(reloaded.eval())(batch.input_ids, batch.attention_mask, batch.position_ids,
                                                     batch.target_positions)
        reloaded_loss, _ = trainer.loss_fn(hidden, lm_head_spec(reloaded).weight, batch.labels, batch.layout)
    assert torch.allclose(reloaded_loss, trained_loss, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(tmp_path):
    run = dict(max_steps=6, save_every=100)
    one = tmp_path / "one"
    subprocess.run(cli(str(one), grad_accum=2, **run), check=True, capture_output=True)
    two = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "tuna_train.cli", "train",
                           *flags(**dict(SMALL, tensorboard=True, output_dir=str(two), grad_accum=1, **run))],
                          capture_output=True, text=True)  # the trackers a user keeps (TensorBoard on)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert list((two / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1
    for (step_a, _, a), (step_b, _, b) in zip(train_records(one), train_records(two), strict=True):
        assert step_a == step_b
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), step_a


def test_non_finite_loss_stops_cleanly_or_is_skipped(tmp_path, monkeypatch):
    original = FusedCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, batch, scores_only=False):  # the 4th training forward gives a NaN loss
        if scores_only:
            return original(self, batch, scores_only)
        loss, metrics = original(self, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), metrics

    monkeypatch.setattr(FusedCausalLM, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4: the loss is nan"):
        Trainer(small_config(tmp_path / "stop", max_steps=6, save_every=2)).run()
    checkpoints = tmp_path / "stop" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-0000002"
    weights = load_file(str(checkpoints / "step-0000002" / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    calls["n"] = 0
    summary = Trainer(small_config(tmp_path / "skip", max_steps=6, save_every=100, skip_nonfinite=True)).run()
    assert summary["status"] == "finished" and summary["skipped_nonfinite"] == 1


def test_grad_filter_eps_reaches_the_backward_and_is_checked(tmp_path, monkeypatch):
    """``tuna train --grad-filter-eps`` filters in the training step's backward (chunked on CPU: the same
    tiles as Triton's); a value outside [0, 1) is refused naming the field; 0 filters nothing."""
    from tuna_kernels import chunked

    thresholds = []
    real_drop = chunked.drop_small_blocks

    def spy(grad_logits, grad_rows, eps, block=None):
        thresholds.append(eps)
        return real_drop(grad_logits, grad_rows, eps, block)

    monkeypatch.setattr(chunked, "drop_small_blocks", spy)
    Trainer(small_config(tmp_path / "off", max_steps=1, save_every=100)).train_step(0)
    assert thresholds == []
    Trainer(small_config(tmp_path / "on", max_steps=1, save_every=100, grad_filter_eps=0.02)).train_step(0)
    assert thresholds and set(thresholds) == {0.02}
    with pytest.raises(ValueError, match="'grad_filter_eps' must be in"):
        small_config(tmp_path / "bad", grad_filter_eps=-1.0)


def test_training_never_materialises_logits(tmp_path):
    from tuna_train.model import build_tiny_llama, synthetic_tokenizer

    vocab_size = 8192  # larger than the chunked path's vocabulary chunk, so a logits tensor would stand out
    trainer = Trainer(small_config(tmp_path, max_steps=1, save_every=100),
                      model=build_tiny_llama(vocab_size=vocab_size, hidden_size=32), tokenizer=synthetic_tokenizer())
    batch = trainer.make_batch(trainer.groups_for(0, 0))
    num_targets = batch.labels.shape[0]

    with AllocationTracker(record_shapes=True) as tracker:
        trainer.train_step(0)
    vocab_rows = [numel_rows(shape, vocab_size) for shape, _, _ in tracker.shapes if vocab_size in shape]
    assert vocab_rows, "the tracker should see the lm_head weight and its gradient"
    assert max(vocab_rows) <= 32, f"a tensor with {max(vocab_rows)} rows of vocabulary size was created"
    assert num_targets > 32

    with AllocationTracker(record_shapes=True) as naive:  # the tracker does see materialised logits
        trainer.model(input_ids=batch.input_ids[:1]).logits.sum()
    assert max(numel_rows(s, vocab_size) for s, _, _ in naive.shapes if vocab_size in s) >= batch.input_ids.shape[1]


def numel_rows(shape, vocab_size):
    numel = 1
    for size in shape:
        numel *= size
    return numel // vocab_size


@pytest.mark.slow
def test_embedded_default_learns_to_rank(tmp_path):
    """`tuna train` with no data or model argument: the README's main job, as a user runs it."""
    started = time.time()
    done = subprocess.run([str(Path(sys.executable).with_name("tuna")), "train", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True)
    elapsed = time.time() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed <= 300, f"the embedded default took {elapsed:.0f} s"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert 0.3 <= summary["initial_eval"]["pair_accuracy"] <= 0.7
    final = summary["final_eval"]
    assert final["pair_accuracy"] >= 0.85  # held-out instructions, none of them in training
    # the controls: another held-out prompt, and a scorer that never sees the prompt, stay near chance
    assert final["shuffled_pair_accuracy"] <= 0.65 and final["prompt_free_pair_accuracy"] <= 0.65
    assert summary["initial_eval"]["prompt_free_pair_accuracy"] == final["prompt_free_pair_accuracy"]
    assert "held-out pairwise ranking accuracy: before" in done.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), local_files_only=True)
