"""Tiny training runs that the resume and checkpoint tests share: a run stopped as SIGTERM stops it, its metrics
and its latest weights, the check that a stopped and resumed run matches an uninterrupted one, and a checkpoint's manifest brought up to date after a file was changed.

(A module of its own, as helpers.py: test modules import it, never each other.)
"""

import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from tuna_train.config import load_config
from tuna_train.trainer import Trainer

# 40 examples -> 36 training groups -> 9 steps per epoch at 4 groups a step
TINY = dict(synthetic_examples=40, batch_groups=4, tiny_hidden_size=32, eval_groups=4, progress=False,
            tensorboard=False, eval_every=0, log_every=1, save_every=100, warmup_steps=2)


def config(output_dir, **overrides):
    return load_config(None, dict(TINY, output_dir=str(output_dir), **overrides))


def run(output_dir, stop_after=None, **overrides):
    """Train; with ``stop_after`` the run stops gracefully (checkpoint, as on SIGTERM) after that many steps."""
    trainer = Trainer(config(output_dir, **overrides))
    if stop_after is not None:
        trainer.callbacks.append(lambda step, metrics: trainer.request_stop() if step == stop_after else None)
    return trainer.run()


def cli_flags(**overrides):
    """``tuna train`` flags for the TINY run with ``overrides`` (field=value)."""
    flags = []
    for name, value in dict(TINY, **overrides).items():
        flags += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def latest_weights(output_dir):
    checkpoints = Path(output_dir) / "checkpoints"
    return load_file(str(checkpoints / (checkpoints / "latest").read_text() / "trainable.safetensors"))


def metrics(output_dir, split="train"):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if r["split"] == split]  # no timing


def restamp(checkpoint, tensors=None):
    """Make the checkpoint's manifest list its files' present sizes (and ``tensors``' specs, name -> (shape,
    dtype name)): as whoever changed the files could have done, so the checks behind the manifest's are met."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {name: (checkpoint / name).stat().st_size for name in manifest["files"]
                         if (checkpoint / name).exists()}
    for name, (shape, dtype) in (tensors or {}).items():
        manifest["tensors"][name] = {"shape": list(shape), "dtype": dtype}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def assert_resumed_exactly(tmp_path, stop_after, total, **overrides):
    straight = run(tmp_path / "straight", max_steps=total, **overrides)
    first = run(tmp_path / "broken", stop_after=stop_after, max_steps=total, **overrides)
    assert first["status"] == "interrupted" and first["steps"] == stop_after and first["resumed_from_step"] is None
    resumed = run(tmp_path / "broken", max_steps=total, **overrides)
    assert resumed["status"] == "finished" and resumed["resumed_from_step"] == stop_after
    assert resumed["steps_this_run"] == total - stop_after and straight["steps_this_run"] == total
    rows = metrics(tmp_path / "broken")
    assert [r["step"] for r in rows] == list(range(1, total + 1))  # exactly one row per step
    assert rows == metrics(tmp_path / "straight")  # losses, lr, grad norms: bit for bit
    assert len(metrics(tmp_path / "broken", "eval")) == len(metrics(tmp_path / "straight", "eval"))
    expected, got = latest_weights(tmp_path / "straight"), latest_weights(tmp_path / "broken")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert resumed["final_eval"] == straight["final_eval"] and resumed["initial_eval"] == straight["initial_eval"]


def ctrl_c_in_stage(stage: str, at_step: int = 1) -> type:
    """A Trainer that sends this process a real SIGINT (what Ctrl-C does) at the end of step ``at_step`` of the
    pipeline stage whose output directory is ``stage``; the other stages train as usual."""

    class CtrlCInStage(Trainer):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            if Path(config.output_dir).name == stage:
                self.callbacks.append(lambda step, _: step == at_step and os.kill(os.getpid(), signal.SIGINT))

    return CtrlCInStage
