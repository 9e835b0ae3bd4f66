"""The adapter reference (the model with its LoRA adapters off) where users run it at lower precision: under
4-bit QLoRA (bitsandbytes' CPU backend) and under bf16 autocast. Its scores are checked against the base model's
own float64 forward (logits of every position, no tuna_hf code) within the bound each precision allows, and are
checked to carry no gradient: the adapters' gradients are those of the same loss with the scores as constants."""

import copy

import pytest
import torch

from helpers import GROUPS, TARGETS, RecordingLoss, batch, float64_scores, rel_err, tiny, with_adapters
from tuna_hf import fused_batch_forward, tuna_loss
from tuna_kernels import TunaLoss
from tuna_train.build import build_model
from tuna_train.collate import pack, tokenize_group
from tuna_train.config import load_config
from tuna_train.data import examples_from_records
from tuna_train.model import load_model
from tuna_train.synthetic import make_records

#: relative error of the reference scores against the base model's float64 forward: a 4-bit model computing in
#: float32 is its dequantised weights in float32 (float32 rounding only; measured 5.5e-8); bf16 autocast rounds
#: every matmul input to 8 bits of mantissa: within bf16's unit roundoff 2^-8 (measured 8.7e-4)
BOUNDS = {"qlora_float32": 1e-6, "bf16_autocast": 2.0 ** -8}


def packed_float64_scores(model, batch):
    """[S] mean token log-prob of each candidate of a per-candidate PackedBatch under ``model``'s own float64
    logits (every position's, then the batch's target positions)."""
    model = model.double()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_positions)
    logprobs = torch.log_softmax(flat, dim=-1).gather(1, batch.labels[:, None]).squeeze(1)
    seq = batch.layout.seq_index
    sums = torch.zeros(batch.layout.num_seqs, dtype=torch.float64).index_add_(0, seq, logprobs)
    counts = torch.bincount(seq, minlength=batch.layout.num_seqs)
    return sums / counts


def dequantised_base(model_dir, quantised):
    """The float32 model whose Linear weights are the 4-bit model's, dequantised: the base the adapters adapt."""
    bnb = pytest.importorskip("bitsandbytes")
    base = load_model(str(model_dir))
    modules = dict(base.named_modules())
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            modules[name].weight.data.copy_(
                bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float())
    return base


def trained_looking(model):
    """Non-zero LoRA B (zero at initialisation), so that the policy differs from the reference."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_the_adapter_reference_under_qlora_is_the_dequantised_base_model(tiny_model_dir, loss_name="plackett_luce"):
    pytest.importorskip("bitsandbytes")
    config = load_config(None, dict(model=str(tiny_model_dir), load_in_4bit=True, lora=True, lora_r=8,
                                    lora_dropout=0.0, bnb_compute_dtype="float32"))
    model, tokenizer = build_model(config)
    trained_looking(model).train()
    base = dequantised_base(tiny_model_dir, model)
    examples = examples_from_records(make_records(4, seed=3), source="test")
    packed = pack([tokenize_group(e, tokenizer, "alpaca", 512) for e in examples], "per_candidate")
    loss_fn = RecordingLoss(loss=loss_name, beta=2.0, impl="chunked")
    loss, _ = fused_batch_forward(model, packed, loss_fn, reference="adapter")
    ref = loss_fn.seen_ref_scores
    assert not ref.requires_grad
    valid = packed.layout.valid()
    expected = packed.layout.to_matrix(packed_float64_scores(base, packed))
    error = rel_err(ref[valid], expected[valid])
    assert error <= BOUNDS["qlora_float32"], error
    policy = packed.layout.to_matrix(packed_float64_scores(trained_looking_policy(model, base), packed))
    assert rel_err(policy[valid], expected[valid]) > 100 * BOUNDS["qlora_float32"]  # the adapters were on: differ
    adapters = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    grads = torch.autograd.grad(loss, adapters)
    packed.ref_scores = ref.clone()  # the same scores as constants, read from the batch
    again, _ = fused_batch_forward(model, packed, TunaLoss(loss=loss_name, beta=2.0, impl="chunked"),
                                   reference="field")
    for got, want in zip(grads, torch.autograd.grad(again, adapters)):
        assert rel_err(got, want) <= 1e-6


def trained_looking_policy(quantised, base):
    """The policy in float32: ``base`` (dequantised) with the 4-bit model's LoRA weights."""
    from tuna_train.model import add_lora

    policy = add_lora(copy.deepcopy(base), r=8, alpha=32, dropout=0.0, target_modules="all-linear")
    policy.load_state_dict({n: p for n, p in quantised.state_dict().items() if "lora_" in n}, strict=False)
    return policy


def test_the_adapter_reference_under_bf16_autocast_is_the_base_model(loss_name="lipo_lambda"):
    base = tiny(tied=False)
    with torch.no_grad():  # peaked next-token distributions, as a trained model's: bf16's rounding shows in them
        base.lm_head.weight.mul_(40)
    start = copy.deepcopy(base)
    model = with_adapters(base, target_modules=TARGETS)
    inputs = batch()
    loss_fn = RecordingLoss(loss=loss_name, beta=2.0, impl="chunked")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = tuna_loss(model, *inputs, group_sizes=GROUPS, reference="adapter", loss_fn=loss_fn)
        # the base model through the same fused pass, under the same autocast: the same numbers
        same_path = RecordingLoss(loss=loss_name, beta=2.0, impl="chunked")
        tuna_loss(with_adapters(copy.deepcopy(start), target_modules=TARGETS), *inputs, group_sizes=GROUPS,
                  reference="adapter", loss_fn=same_path)
    ref = loss_fn.seen_ref_scores
    assert not ref.requires_grad and ref.dtype == torch.float32
    expected = float64_scores(start, *inputs)
    got = torch.cat([ref[0], ref[1, :1]])
    error = rel_err(got, expected)
    assert error <= BOUNDS["bf16_autocast"], error
    assert torch.equal(ref, same_path.seen_ref_scores)
    full_precision = RecordingLoss(loss=loss_name, beta=2.0, impl="chunked")
    tuna_loss(model, *inputs, group_sizes=GROUPS, reference="adapter", loss_fn=full_precision)
    assert rel_err(ref, full_precision.seen_ref_scores) > 1e-4  # autocast did round the pass
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(loss, adapters)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again, _ = tuna_loss(model, *inputs, group_sizes=GROUPS, ref_scores=ref.clone(),
                             loss_fn=TunaLoss(loss=loss_name, beta=2.0, impl="chunked"))
    for got_grad, want in zip(grads, torch.autograd.grad(again, adapters)):
        assert rel_err(got_grad, want) <= 1e-6
