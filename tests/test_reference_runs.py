"""Issue 25's acceptance runs, as tests: `tuna train --loss plackett_luce|lipo_lambda --reference adapter --lora`
on the embedded default (the tiny Llama on the built-in tasks) and on SmolLM2-135M-Instruct (chat template, a few
groups and steps), each killed with SIGKILL after a step that has no checkpoint of its own, resumed, and
compared with an uninterrupted run: every metrics row and every trainable weight bit for bit."""

import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_runs import cli_flags, latest_weights, metrics
from tuna_train import cli

pytestmark = pytest.mark.slow

#: `tuna train` in a process that SIGKILLs itself right after optimizer step KILL_AFTER (after its metrics row is
#: written, before any checkpoint of that step): a kill no handler sees, as the OOM killer's
KILLED_TRAIN = """
import os, signal, sys
from tuna_train import cli, trainer
built = trainer.Trainer.__init__
def with_kill(self, *args, **kwargs):
    built(self, *args, **kwargs)
    self.callbacks.append(lambda step, metrics: os.kill(os.getpid(), signal.SIGKILL) if step == {kill_after} else None)
trainer.Trainer.__init__ = with_kill
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def assert_killed_run_resumes_exactly(tmp_path, kill_after, **overrides):
    """An uninterrupted `tuna train` run; the same run SIGKILLed after step ``kill_after`` and run again (it
    resumes from its last checkpoint): the same metrics rows (losses, learning rates, gradient norms; one per
    step), the same evaluations, the same latest checkpoint and final adapter, bit for bit."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert cli.main(["train", *cli_flags(output_dir=str(straight), **overrides)]) == 0
    killed = subprocess.run([sys.executable, "-c", KILLED_TRAIN.format(kill_after=kill_after),
                             *cli_flags(output_dir=str(broken), **overrides)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["step"] for r in metrics(broken)] == list(range(1, kill_after + 1))  # the killed step's row is there
    assert cli.main(["train", *cli_flags(output_dir=str(broken), **overrides)]) == 0
    total = overrides["max_steps"]
    assert [r["step"] for r in metrics(broken)] == list(range(1, total + 1))  # the killed step's row: once
    assert metrics(broken) == metrics(straight)
    assert metrics(broken, "eval") == metrics(straight, "eval")
    for expected, got in ((latest_weights(straight), latest_weights(broken)),
                          (load_file(str(straight / "final" / "adapter_model.safetensors")),
                           load_file(str(broken / "final" / "adapter_model.safetensors")))):
        assert expected.keys() == got.keys() and expected
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


# the embedded default, shortened: 4 steps, a checkpoint every 2, killed after step 3
TINY_RUN = dict(reference="adapter", lora=True, lora_r=4, lora_dropout=0.1, max_steps=4, save_every=2)


@pytest.mark.parametrize("loss_name", ["plackett_luce", "lipo_lambda"])
def test_tuna_train_with_the_adapter_reference_on_the_default_resumes_after_a_kill(tmp_path, loss_name):
    assert_killed_run_resumes_exactly(tmp_path, kill_after=3, loss=loss_name, **TINY_RUN)


@pytest.mark.real_model
@pytest.mark.parametrize("loss_name", ["plackett_luce", "lipo_lambda"])
def test_tuna_train_with_the_adapter_reference_on_smollm2_resumes_after_a_kill(tmp_path, smollm2_dir, loss_name):
    """SmolLM2 in its chat template, as small as a resume can be (a SmolLM2 step with its reference pass costs
    seconds on a CPU): one group of 3 candidates of the built-in tasks a step, 2 steps, a checkpoint every step,
    killed after step 2 (resumed from step 1); nothing held out (the default's runs check the evaluations)."""
    assert_killed_run_resumes_exactly(
        tmp_path, kill_after=2, loss=loss_name, model=str(smollm2_dir), template="chat", synthetic_examples=4,
        eval_fraction=0.0, batch_groups=1, max_length=40, max_candidates=3, reference="adapter", lora=True, lora_r=4,
        lora_dropout=0.1, lora_target_modules="q_proj,v_proj", max_steps=2, save_every=1)
