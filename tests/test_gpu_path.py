"""The training loop on the code a GPU user runs: the Triton kernels through the real trainer (under the
interpreter), and QLoRA with bf16 compute and gradient checkpointing."""

import os

import pytest
import torch

from helpers import rel_err
from tuna_train.config import load_config
from tuna_train.trainer import Trainer

TINY = dict(synthetic_examples=120, batch_groups=2, tiny_hidden_size=32, eval_groups=4, progress=False,
            tensorboard=False, eval_every=0, log_every=1, save_every=100, warmup_steps=0, learning_rate=1e-2,
            lr_schedule="constant")


def run_steps(output_dir, steps, **overrides):
    """(per-step losses, the first step's gradients, parameters before and after) of ``steps`` optimizer steps
    of the real training step."""
    trainer = Trainer(load_config(None, dict(TINY, output_dir=str(output_dir), max_steps=steps, **overrides)))
    params = dict(trainer.model.named_parameters())
    initial = {name: p.detach().clone() for name, p in params.items()}
    first_grads = {}
    optimizer_step = trainer.optimizer.step

    def step(*args, **kwargs):
        if not first_grads:
            first_grads.update({name: p.grad.clone() for name, p in params.items() if p.grad is not None})
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step
    trainer.wrapped.train()
    losses = [trainer.train_step(step)["loss"] for step in range(steps)]
    return losses, first_grads, initial, {name: p.detach().clone() for name, p in params.items()}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_triton_kernels_through_the_trainer_match_the_chunked_path(tmp_path):
    # a small learning rate: Adam turns the last-bit differences of near-zero gradients into steps of +-lr
    chunked_losses, chunked_grads, initial, chunked_weights = run_steps(tmp_path / "chunked", 3, impl="chunked",
                                                                        learning_rate=1e-4)
    triton_losses, triton_grads, _, triton_weights = run_steps(tmp_path / "triton", 3, impl="triton",
                                                               learning_rate=1e-4)
    assert triton_losses == pytest.approx(chunked_losses, rel=1e-5)
    assert chunked_grads.keys() == triton_grads.keys() and "lm_head.weight" in chunked_grads
    for name, expected in chunked_grads.items():
        assert rel_err(triton_grads[name], expected) <= 1e-5, name
    for name, expected in chunked_weights.items():
        assert rel_err(triton_weights[name], expected) <= 1e-5, name
        moved = rel_err(expected, initial[name])
        assert moved > 1e-4 or "embed" in name or "norm" in name, (name, moved)  # the steps did change it


@pytest.mark.slow
def test_qlora_with_bf16_compute_and_gradient_checkpointing_trains(tmp_path, tiny_model_dir, monkeypatch):
    """The 24 GB recipe (NF4 base, LoRA, bf16 autocast, gradient checkpointing): the fused loss runs in bf16."""
    import bitsandbytes as bnb

    from tuna_kernels import autograd

    seen = []
    original = autograd.FusedTokenLogprobs.forward

    def spy(ctx, backend, hidden, weight, *args):
        seen.append((hidden.dtype, weight.dtype))
        return original(ctx, backend, hidden, weight, *args)

    monkeypatch.setattr(autograd.FusedTokenLogprobs, "forward", staticmethod(spy))
    trainer = Trainer(load_config(None, dict(
        TINY, output_dir=str(tmp_path), model=str(tiny_model_dir), load_in_4bit=True, lora=True, lora_r=8,
        bnb_compute_dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing=True, max_steps=6,
        learning_rate=1e-2, eval_groups=8)))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert trainer.model.get_base_model().is_gradient_checkpointing
    summary = trainer.run()
    assert summary["status"] == "finished"
    assert summary["final_eval"]["mle_loss"] < summary["initial_eval"]["mle_loss"]
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, set(seen)
