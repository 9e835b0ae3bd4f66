"""Training defaults that fit a real model, while the embedded default keeps its own: a token budget per forward
(max_batch_tokens, counted as packing lays the tokens out), LoRA's learning rate and warm-up on a model, a
warm-up as long as the run warned about, and a template refused on the tokenizer before the model loads."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from tuna_train.build import warmup_steps
from tuna_train.collate import pack, padded_tokens, split_by_tokens, tokenize_group
from tuna_train.config import REAL_LORA_LEARNING_RATE, REAL_MODEL_BATCH_TOKENS, TrainConfig, load_config
from tuna_train.data import examples_from_records
from tuna_train.model import synthetic_tokenizer
from tuna_train.synthetic import make_records
from tuna_train.trainer import Trainer


@pytest.fixture(scope="module")
def groups():
    examples = examples_from_records(make_records(7, seed=11))
    examples[2].responses, examples[2].scores = examples[2].responses[:2], examples[2].scores[:2]  # ragged
    return [tokenize_group(e, synthetic_tokenizer(), "alpaca", 512) for e in examples]


@pytest.mark.parametrize("layout", ["shared", "per_candidate"])
def test_padded_tokens_are_those_packing_lays_out_and_pieces_keep_within_the_budget(groups, layout):
    for count in range(1, len(groups) + 1):
        assert padded_tokens(groups[:count], layout) == pack(groups[:count], layout).stats["padded_tokens"]
    budget = 2 * padded_tokens(groups[:1], layout)
    pieces = split_by_tokens(groups, layout, budget)
    assert [g for piece in pieces for g in piece] == list(groups) and len(pieces) > 1  # whole groups, in order
    for piece in pieces:
        assert pack(piece, layout).stats["padded_tokens"] <= budget or len(piece) == 1
    assert split_by_tokens(groups, layout, 0) == [list(groups)]  # 0: no budget


def test_the_defaults_follow_what_is_trained():
    embedded = TrainConfig()
    assert (embedded.learning_rate, embedded.warmup_steps, embedded.max_batch_tokens) == (3e-3, 20, 0)
    lora = TrainConfig(model="some/model", lora=True)
    assert lora.learning_rate == REAL_LORA_LEARNING_RATE and lora.warmup_steps is None
    assert lora.max_batch_tokens == REAL_MODEL_BATCH_TOKENS
    assert warmup_steps(lora, 50) == 5 and warmup_steps(lora, 2) == 0  # a tenth of the run
    full = TrainConfig(model="some/model")  # full fine-tuning keeps the rate and warm-up it had
    assert (full.learning_rate, full.warmup_steps, full.max_batch_tokens) == (3e-3, 20, REAL_MODEL_BATCH_TOKENS)
    chosen = load_config(None, dict(model="some/model", lora=True, learning_rate="1e-3", warmup_steps="3",
                                    max_batch_tokens="0"))
    assert (chosen.learning_rate, chosen.warmup_steps, chosen.max_batch_tokens) == (1e-3, 3, 0)  # what was set


def test_a_warm_up_as_long_as_the_run_is_warned(caplog):
    config = TrainConfig(model="some/model", warmup_steps=20)
    with caplog.at_level(logging.WARNING, logger="tuna_train.build"):
        assert warmup_steps(config, 2) == 20
    assert "warmup_steps 20 is not shorter than the run's 2 steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuna_train.build"):
        warmup_steps(config, 21)
    assert not caplog.text


def _step_gradients(tmp_path, **overrides):
    """The accumulated gradients of optimizer step 0 (the update itself not taken), and the groups each forward
    packed: (grads by parameter name, [(groups, padded tokens)])."""
    config = load_config(None, dict(synthetic_examples=40, batch_groups=8, grad_accum=2, tiny_hidden_size=32,
                                    max_steps=1, eval_fraction=0, progress=False, tensorboard=False,
                                    eval_controls=False, loss="listmle", mle_weight=0.0, max_grad_norm=0.0,
                                    output_dir=str(tmp_path), **overrides))
    trainer = Trainer(config)
    grads, packed = {}, []
    params = dict(trainer.model.named_parameters())

    def record():
        grads.update({name: p.grad.clone() for name, p in params.items() if p.grad is not None})

    pack_groups = trainer._pack
    trainer._pack = lambda groups: (packed.append((len(groups), padded_tokens(groups, config.packing))),
                                    pack_groups(groups))[1]
    trainer.optimizer_step.optimizer.step = record
    trainer.train_step(0)
    trainer.run_lock.release()
    return grads, packed


def test_a_step_in_pieces_of_the_token_budget_has_the_gradient_of_whole_micro_batches(tmp_path):
    """A loss that is a mean over groups (listmle, no MLE term): micro-batches run in pieces of at most 700
    padded tokens, each weighted by its share of the groups, accumulate the gradient of one forward per
    micro-batch; more forwards ran, none over the budget but a single group."""
    whole, packed_whole = _step_gradients(tmp_path / "whole")
    pieces, packed = _step_gradients(tmp_path / "pieces", max_batch_tokens=700)
    assert [n for n, _ in packed_whole] == [8, 8]
    assert len(packed) > 2 and sum(n for n, _ in packed) == 16
    assert all(tokens <= 700 or n == 1 for n, tokens in packed), packed
    assert whole.keys() == pieces.keys() and whole
    for name in whole:
        assert torch.allclose(pieces[name], whole[name], rtol=1e-4, atol=1e-7), name


def test_template_chat_is_refused_on_the_tokenizer_before_the_model_loads(tmp_path):
    """A directory with only a tokenizer (no chat template, no weights): the template's error, naming it."""
    model_dir = tmp_path / "tokenizer-only"
    synthetic_tokenizer().save_pretrained(str(model_dir))
    config = load_config(None, dict(model=str(model_dir), template="chat", synthetic_examples=20, progress=False,
                                    tensorboard=False, output_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match=f"{model_dir}: template 'chat' needs a tokenizer with a chat template"):
        Trainer(config)
    assert torch.is_grad_enabled()
