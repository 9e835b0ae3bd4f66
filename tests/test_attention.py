"""Every attention implementation that runs on the CPU gives the same log-likelihoods in both layouts
(prefix-shared rows with a 4D mask, and one row per candidate); flash-attention with the shared layout is
refused before any model loads."""

import pytest
import torch

from tuna_train.collate import pack, tokenize_group
from tuna_train.config import load_config
from tuna_train.data import examples_from_records
from tuna_hf.model import TargetHiddenStates, lm_head_spec, model_attention_mask
from tuna_train.model import build_tiny_llama, synthetic_tokenizer
from tuna_train.synthetic import make_records

CPU_IMPLEMENTATIONS = ("sdpa", "eager")


def mean_token_logprobs(model, batch):
    with torch.no_grad():
        hidden = TargetHiddenStates(model)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                           batch.target_positions)
        sums, counts = lm_head_spec(model).sequence_logprobs(hidden, batch.labels, batch.layout.seq_index,
                                                             batch.layout.num_seqs)
    return sums / counts


def test_every_cpu_attention_gives_the_same_logprobs_in_both_layouts():
    tokenizer = synthetic_tokenizer()
    groups = [tokenize_group(e, tokenizer, "alpaca", 512) for e in examples_from_records(make_records(6, seed=7), source="test")]
    batches = {layout: pack(groups, layout) for layout in ("shared", "per_candidate")}
    assert batches["shared"].attention_mask.dim() == 4
    reference = mean_token_logprobs(build_tiny_llama(seed=1, attn_implementation="sdpa").eval(),
                                    batches["per_candidate"])
    for implementation in CPU_IMPLEMENTATIONS:
        model = build_tiny_llama(seed=1, attn_implementation=implementation).eval()
        for layout, batch in batches.items():
            got = mean_token_logprobs(model, batch)
            assert torch.allclose(got, reference, rtol=0, atol=1e-5), (implementation, layout,
                                                                       float((got - reference).abs().max()))


def test_eager_gets_an_additive_mask_in_the_model_dtype():
    mask = torch.tensor([[[[True, False], [True, True]]]])
    model = build_tiny_llama(hidden_size=32, attn_implementation="eager").to(torch.bfloat16)
    additive = model_attention_mask(model, mask)
    assert additive.dtype == torch.bfloat16
    assert additive[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min and additive[0, 0, 1].eq(0).all()
    sdpa = build_tiny_llama(hidden_size=32, attn_implementation="sdpa")
    assert model_attention_mask(sdpa, mask) is mask


def test_flash_attention_with_shared_packing_is_refused_before_loading():
    with pytest.raises(ValueError, match="flash_attention_2.*per_candidate"):
        load_config(None, dict(attn_implementation="flash_attention_2", packing="shared"))
    load_config(None, dict(attn_implementation="flash_attention_2", packing="per_candidate"))
    model = build_tiny_llama(hidden_size=32)
    model.config._attn_implementation = "flash_attention_2"  # a model a user built: refused at the forward
    with pytest.raises(ValueError, match="per_candidate"):
        model_attention_mask(model, torch.ones(1, 1, 2, 2, dtype=torch.bool))
