"""Adapters where users put them: on the lm_head (peft LoRA, tied or not, modules_to_save) the fused losses give
the loss and every adapter gradient of the model's own forward (float64 cross-entropy of its logits); what they
cannot reproduce (DoRA, trainable tokens) is refused before any loss is computed, never replaced by the base
weight. The same cases on the real checkpoints are in test_real_models.py."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import batch, own_logits, rel_err, tiny, with_adapters
from naive_tuna import tuna_objective_from_logits
from tuna_hf import UnsupportedHead, causal_lm_loss, lm_head_spec, tuna_loss
from tuna_train.config import load_config
from tuna_train.trainer import Trainer

TARGETS = ["q_proj", "v_proj", "lm_head"]


def model_own_loss(model, input_ids, attention_mask, labels):
    """The mean token cross-entropy of the model's own logits, in float64."""
    logits, targets, _ = own_logits(model, input_ids, attention_mask, labels)
    return torch.nn.functional.cross_entropy(logits, targets)


def model_own_tuna_loss(model, input_ids, attention_mask, labels):
    """The Tuna objective (rows = candidates of one group, best first) of the model's own logits, in float64."""
    logits, targets, rows = own_logits(model, input_ids, attention_mask, labels)
    return tuna_objective_from_logits(logits, targets, rows, {k: (0, k) for k in range(input_ids.shape[0])})


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def assert_same_loss_and_grads(model, fused_fn, reference_fn=model_own_loss):
    params = trainable(model)
    data = batch()
    expected = reference_fn(model, *data)
    expected_grads = torch.autograd.grad(expected, [p for _, p in params])
    loss = fused_fn(model, *data)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for (name, _), grad, want in zip(params, grads, expected_grads):
        assert grad is not None, f"{name}: no gradient (not in the fused graph)"
        assert rel_err(grad, want) <= 1e-5, (name, rel_err(grad, want))
    return params


def one_group_tuna_loss(model, input_ids, attention_mask, labels):
    """The fused Tuna loss with every row a candidate of one group, best first."""
    loss, _ = tuna_loss(model, input_ids, attention_mask, labels, group_sizes=[input_ids.shape[0]], impl="chunked")
    return loss


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fused_fn, reference_fn", [(causal_lm_loss, model_own_loss),
                                                    (one_group_tuna_loss, model_own_tuna_loss)],
                         ids=["causal_lm_loss", "tuna_loss"])
def test_lora_on_the_lm_head_gives_the_model_loss_and_adapter_gradients(tied, fused_fn, reference_fn):
    model = with_adapters(tiny(tied), target_modules=TARGETS)
    assert lm_head_spec(model).adapters, "the lm_head adapter was not found"
    names = [name for name, _ in assert_same_loss_and_grads(model, fused_fn, reference_fn)]
    assert any("lm_head.lora_A" in n for n in names) and any("lm_head.lora_B" in n for n in names)


def test_lm_head_lora_dropout_is_applied_to_the_adapter_branch_only():
    """A stand-in dropout that is deterministic (halves its input) must reach the adapter term as in peft's forward."""
    model = with_adapters(tiny(False), target_modules=TARGETS)
    head = model.base_model.model.lm_head
    head.lora_dropout["default"] = HalfDropout()
    assert_same_loss_and_grads(model, causal_lm_loss)


class HalfDropout(torch.nn.Module):
    def forward(self, x):
        return x * 0.5


def test_several_active_adapters_and_lora_bias_on_the_lm_head():
    model = with_adapters(tiny(False), target_modules=TARGETS, lora_bias=False)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["lm_head"],
                                           lora_bias=True))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "second" in name and "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    assert len(lm_head_spec(model).adapters) == 2
    assert_same_loss_and_grads(model, causal_lm_loss)


def test_modules_to_save_lm_head_uses_the_trained_copy():
    model = get_peft_model(tiny(False), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    params = assert_same_loss_and_grads(model, causal_lm_loss)
    assert any("modules_to_save" in name for name, _ in params)


def test_disabled_and_merged_adapters_use_what_the_model_runs():
    model = with_adapters(tiny(False), target_modules=TARGETS)
    data = batch()
    with model.disable_adapter():
        assert not lm_head_spec(model).adapters
        assert float(causal_lm_loss(model, *data)) == pytest.approx(float(model_own_loss(model, *data)), rel=1e-5)
    model.merge_adapter()
    assert not lm_head_spec(model).adapters  # the merged weight already holds it
    assert float(causal_lm_loss(model, *data)) == pytest.approx(float(model_own_loss(model, *data)), rel=1e-5)


@pytest.mark.parametrize("config, pattern", [
    (dict(target_modules=TARGETS, use_dora=True), "DoRA"),
    (dict(target_modules=["q_proj"], trainable_token_indices={"lm_head": [5, 6]}), "TrainableTokens"),
], ids=["dora", "trainable-tokens"])
def test_what_the_fused_loss_cannot_reproduce_is_refused(config, pattern):
    model = get_peft_model(tiny(False), LoraConfig(r=4, **config))
    with pytest.raises(UnsupportedHead, match=pattern):
        causal_lm_loss(model, *batch())


def test_the_trainer_refuses_an_lm_head_dora_before_training(tmp_path, tiny_model_dir):
    from tuna_train.model import load_model, load_tokenizer

    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    config = load_config(None, dict(output_dir=str(tmp_path / "run"), progress=False, tensorboard=False, max_steps=2,
                                    synthetic_examples=40))
    with pytest.raises(UnsupportedHead, match="DoRA"):
        Trainer(config, model=model, tokenizer=load_tokenizer(str(tiny_model_dir)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tuna_train_trains_an_lm_head_adapter(tmp_path, tiny_model_dir):
    config = load_config(None, dict(model=str(tiny_model_dir), lora=True, lora_r=4,
                                    lora_target_modules="q_proj,v_proj,lm_head", output_dir=str(tmp_path / "run"),
                                    progress=False, tensorboard=False, max_steps=3, warmup_steps=0, eval_every=0,
                                    save_every=100, synthetic_examples=40, batch_groups=4, learning_rate=1e-2))
    trainer = Trainer(config)
    head = lm_head_spec(trainer.model)
    assert head.adapters
    trainer.run()
    assert float(head.adapters[0].lora_B.weight.abs().sum()) > 0, "the lm_head adapter got no update"
