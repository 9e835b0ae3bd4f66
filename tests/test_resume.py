"""Runs and checkpoints (issue 15, points 1, 3 and 13-15): no pickle on resume, a validated `latest`
pointer, one run per output directory, no silent resume with other settings, and resumes that are checked
to have resumed (step, steps left, one metrics row per step) and to match an uninterrupted run exactly:
full fine-tuning across an epoch boundary, LoRA with dropout (RNG restore), QLoRA."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train_runs import assert_resumed_exactly, config, latest_weights, metrics, restamp, run
from tuna_train.checkpoint import CheckpointError
from tuna_train.run_dir import RunDirectoryError
from tuna_train.trainer import Trainer


def test_resume_across_an_epoch_boundary_is_exact(tmp_path):
    assert_resumed_exactly(tmp_path, stop_after=7, total=12)  # stops in epoch 1, ends in epoch 2


def test_resume_with_lora_dropout_restores_the_rng(tmp_path):
    assert_resumed_exactly(tmp_path, stop_after=3, total=6, lora=True, lora_r=4, lora_dropout=0.5,
                           learning_rate=1e-2)


def test_resume_with_qlora_is_exact(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    assert_resumed_exactly(tmp_path, stop_after=2, total=4, model=str(tiny_model_dir), load_in_4bit=True, lora=True,
                           lora_r=4, lora_dropout=0.1, bnb_compute_dtype="float32", optimizer="paged_adamw_8bit",
                           learning_rate=1e-2)


class Payload:
    """Unpickling this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", ["optimizer.pt", "rng-0.pt"])
def test_a_pickle_payload_in_a_checkpoint_never_runs(tmp_path, target):
    run(tmp_path, stop_after=2, max_steps=4)
    checkpoint = tmp_path / "checkpoints" / "step-0000002"
    marker = tmp_path / "payload-ran"
    if target == "rng-0.pt":  # a checkpoint in the old format: a pickled RNG state
        (checkpoint / "rng-0.json").unlink(missing_ok=True)
    torch.save({"state": {}, "param_groups": [], "payload": Payload(marker)}, checkpoint / target)
    restamp(checkpoint)  # past the manifest's size check: the payload meets torch.load's weights_only guard
    with pytest.raises(CheckpointError, match=f"{checkpoint / target}: .*(refused|not loaded)"):
        run(tmp_path, max_steps=4)
    assert not marker.exists()
    assert {p.suffix for p in checkpoint.iterdir()} <= {".safetensors", ".json", ".pt"}
    assert not (checkpoint / "rng-0.pt").exists() or target == "rng-0.pt"  # RNG states are JSON now


@pytest.mark.parametrize("pointer", ["/etc", "../../elsewhere/step-0000002", "step-0000002/../../x", ""])
def test_latest_pointer_must_name_a_checkpoint_inside_checkpoints(tmp_path, pointer):
    run(tmp_path / "elsewhere", stop_after=2, max_steps=4)
    run(tmp_path / "run", stop_after=2, max_steps=4)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match="latest: names .* refusing to follow it"):
        run(tmp_path / "run", max_steps=4)


def test_one_run_per_output_directory(tmp_path):
    holder = Trainer(config(tmp_path, max_steps=2))
    with pytest.raises(RunDirectoryError, match=f"{tmp_path} is in use by another run \\(pid {os.getpid()}"):
        Trainer(config(tmp_path, max_steps=2))
    second = subprocess.run([sys.executable, "-m", "tuna_train.cli", "train", "--output-dir", str(tmp_path),
                             "--max-steps", "2", "--progress", "false"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"pid {os.getpid()}" in second.stderr and str(tmp_path) in second.stderr
    assert holder.run()["status"] == "finished"  # the holder is unharmed, and releases the lock at its end
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert run(tmp_path, max_steps=2)["steps_this_run"] == 0  # the directory is free again


def test_resume_refuses_changed_settings_unless_told(tmp_path):
    run(tmp_path, max_steps=4)
    with pytest.raises(RunDirectoryError) as refused:
        run(tmp_path, max_steps=4, learning_rate=1e-3, synthetic_seed=7, log_every=2)
    message = str(refused.value)
    assert "learning_rate: 0.003 -> 0.001" in message and "synthetic_seed: 1234 -> 7" in message
    assert "log_every" not in message and "--overwrite" in message and "--resume-with-new-settings" in message
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.003

    assert run(tmp_path, max_steps=4, log_every=2)["resumed_from_step"] == 4  # a watching setting: resumed
    continued = run(tmp_path, max_steps=6, learning_rate=1e-3, resume_with_new_settings=True)
    assert continued["resumed_from_step"] == 4 and continued["steps_this_run"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 6  # never stale

    afresh = run(tmp_path, max_steps=3, learning_rate=1e-3, overwrite=True)
    assert afresh["resumed_from_step"] is None and afresh["steps_this_run"] == 3
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000003"]
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 3

    with pytest.raises(RunDirectoryError, match="holds an earlier run .*resume: never"):
        run(tmp_path, max_steps=3, learning_rate=1e-3, resume="never")


class Killed(BaseException):
    """A kill at that point: nothing after it runs (not an Exception: no handler takes it for an error)."""


@pytest.mark.parametrize("save_every", [100, 2])  # the last step with and without its own in-loop checkpoint
def test_a_kill_while_final_is_written_leaves_one_final_eval_row(tmp_path, monkeypatch, save_every):
    """Issue 27.11: the final evaluation is logged once, however the run ended and resumed."""
    straight = run(tmp_path / "straight", max_steps=4, save_every=save_every)

    def killed(self):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_final_model", killed)
        with pytest.raises(Killed):
            run(tmp_path / "broken", max_steps=4, save_every=save_every)
    resumed = run(tmp_path / "broken", max_steps=4, save_every=save_every)
    assert resumed["resumed_from_step"] == 4 and resumed["steps_this_run"] == 0
    assert (tmp_path / "broken" / "final" / "config.json").exists()
    assert [r["step"] for r in metrics(tmp_path / "broken", "eval")] == [0, 4]
    assert metrics(tmp_path / "broken", "eval") == metrics(tmp_path / "straight", "eval")
    assert metrics(tmp_path / "broken") == metrics(tmp_path / "straight")
    assert resumed["final_eval"] == straight["final_eval"] and resumed["best_eval"] == straight["best_eval"]
