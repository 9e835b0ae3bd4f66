"""QLoRA on the CPU computes the gradients a GPU user gets: LoRA gradients of the 4-bit model equal those of
the same network with the dequantised weights in float32, also after an evaluation pass (which makes
bitsandbytes' CPU backend switch its 4-bit weights to an inference-only format)."""

import pytest
import torch

from helpers import rel_err
from tuna_hf.model import TargetHiddenStates, lm_head_spec
from tuna_kernels import TunaLoss
from tuna_train.build import build_model
from tuna_train.collate import pack, tokenize_group
from tuna_train.config import load_config
from tuna_train.data import examples_from_records
from tuna_train.model import add_lora, load_model
from tuna_train.synthetic import make_records

bnb = pytest.importorskip("bitsandbytes")


def tuna_loss(model, batch):
    hidden = TargetHiddenStates(model)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                       batch.target_positions)
    hidden, weight, head_options = lm_head_spec(model).fused_inputs(hidden)
    loss, _ = TunaLoss()(hidden, weight, batch.labels, batch.layout, **head_options)
    return loss


def lora_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    tuna_loss(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}


def dequantised_copy(model_dir, quantised):
    """The float32 model whose Linear weights are the 4-bit model's weights, dequantised."""
    reference = load_model(str(model_dir))
    modules = dict(reference.named_modules())
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            modules[name].weight.data.copy_(weight.float())
    return reference


@pytest.mark.parametrize("evaluate_first", [False, True])
def test_lora_gradients_of_the_4bit_model_equal_the_dequantised_model(tiny_model_dir, evaluate_first):
    config = load_config(None, dict(model=str(tiny_model_dir), load_in_4bit=True, lora=True, lora_r=8,
                                    lora_dropout=0.0, bnb_compute_dtype="float32"))
    model, tokenizer = build_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B, so that gradients reach every A through the frozen 4-bit base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    reference = dequantised_copy(tiny_model_dir, model)  # before any evaluation touches the 4-bit weights
    reference = add_lora(reference, r=8, alpha=config.lora_alpha, dropout=0.0,
                         target_modules=config.lora_target_modules)
    reference.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False)

    examples = examples_from_records(make_records(6, seed=3), source="test")
    batch = pack([tokenize_group(e, tokenizer, "alpaca", 512) for e in examples], "shared")
    if evaluate_first:  # what the trainer does before its first step
        model.eval()
        with torch.no_grad():
            tuna_loss(model, batch)
    model.train()
    got, expected = lora_gradients(model, batch), lora_gradients(reference.train(), batch)
    assert got.keys() == expected.keys() and len(got) > 0
    worst = max(rel_err(got[name], expected[name]) for name in expected)
    assert worst <= 1e-3, f"LoRA gradients differ from the dequantised model by {worst:.3g} (relative)"
