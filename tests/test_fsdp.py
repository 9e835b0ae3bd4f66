"""Sharded training with FSDP2 on CPU processes (gloo): two processes follow the one-process trajectory and
end at the same weights, each holding about half of the parameters. The runs keep the default trackers
(TensorBoard on), as a user's run does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RUN = dict(synthetic_examples=200, batch_groups=4, tiny_hidden_size=32, eval_groups=8, progress=False,
           eval_every=0, log_every=1, max_steps=4, save_every=100, warmup_steps=0,
           learning_rate=1e-3, lr_schedule="constant")


def flags(**values):
    return [arg for key, value in values.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def train_losses(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def run_two_processes(output_dir, **overrides):
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "tuna_train.cli", "train",
                           *flags(**dict(RUN, output_dir=str(output_dir), **overrides))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "error" not in done.stderr.lower(), done.stderr[-4000:]
    return json.loads((Path(output_dir) / "summary.json").read_text())


def tensorboard_steps(output_dir):
    """The train/loss steps TensorBoard holds for a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for events_file in (Path(output_dir) / "tensorboard").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file.parent))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps.update(event.step for event in events.Scalars("train/loss"))
    return steps


@pytest.mark.slow
def test_fsdp_run_with_default_trackers_exits_cleanly(tmp_path):
    """27.1: with TensorBoard on (the default) both ranks used to exit 1 after writing final/: closing the trackers
    destroyed the process group the run still synchronised on."""
    summary = run_two_processes(tmp_path, max_steps=2, sharding="fsdp")
    assert summary["status"] == "finished" and summary["steps"] == 2 and summary["world_size"] == 2
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "final" / "config.json").is_file()
    assert tensorboard_steps(tmp_path) == {step for step, _ in train_losses(tmp_path)} == {1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_fsdp_two_processes_match_one_process(tmp_path, tiny_model_dir, adapters):
    options = dict(model=str(tiny_model_dir), lora=True, lora_dropout=0.0) if adapters else {}
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "train",
                           *flags(**dict(RUN, output_dir=str(one), grad_accum=2, **options))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = run_two_processes(tmp_path / "fsdp", grad_accum=1, sharding="fsdp", **options)
    assert summary["world_size"] == 2 and summary["sharding"] == "fsdp"
    assert summary["local_param_fraction"] == pytest.approx(0.5, abs=0.05)  # each rank holds about half

    for (step_a, loss_a), (step_b, loss_b) in zip(train_losses(one), train_losses(tmp_path / "fsdp"), strict=True):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-5), step_a
    weights = "adapter_model.safetensors" if adapters else "model.safetensors"
    single, sharded = load_file(str(one / "final" / weights)), load_file(str(tmp_path / "fsdp" / "final" / weights))
    assert single.keys() == sharded.keys() and (not adapters or all("lora_" in name for name in single))
    for name, expected in single.items():
        assert torch.allclose(sharded[name], expected, rtol=1e-5, atol=1e-6), name
    initial = json.loads((one / "summary.json").read_text())["initial_eval"]
    assert summary["initial_eval"] == pytest.approx(initial, rel=1e-5)


@pytest.mark.slow
def test_fsdp_killed_and_resumed_ends_at_the_uninterrupted_weights(tmp_path):
    import signal
    import time

    import psutil

    run = dict(max_steps=40, save_every=2, sharding="fsdp")
    straight = run_two_processes(tmp_path / "straight", **run)
    assert straight["resumed_from_step"] is None

    killed = tmp_path / "killed"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "tuna_train.cli", "train",
               *flags(**dict(RUN, output_dir=str(killed), **run))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step-0000002"):
        assert process.poll() is None, "the run ended before its second checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    launcher = psutil.Process(process.pid)
    ranks = launcher.children(recursive=True)
    assert len(ranks) >= 2
    for victim in [launcher, *ranks]:  # the launcher and both ranks, at once (they are in their own groups)
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs([launcher, *ranks], timeout=60)
    process.wait()

    resumed = run_two_processes(killed, **run)
    assert 0 < resumed["resumed_from_step"] < 40 and resumed["steps"] == 40
    expected = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    got = load_file(str(killed / "final" / "model.safetensors"))
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert train_losses(killed) == train_losses(tmp_path / "straight")
