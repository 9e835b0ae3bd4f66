"""tuna_hf: one call from a Hugging Face model to the fused Tuna loss, and the fused causal-LM loss, against
naive references computed from the model's own logits (float32, 1e-5)."""

import pytest
import torch

from helpers import rel_err
from naive_tuna import tuna_objective_from_logits
from tuna_hf import apply_fused_losses, causal_lm_loss, tuna_loss
from tuna_kernels.devtools.memory import AllocationTracker
from tuna_train.model import add_lora, build_tiny_llama, load_model

PROMPT, K = 5, 4


def ranked_batch(vocab_size=384, seed=0):
    """One prompt with K candidate responses (best first), one row each, right-padded; labels -100 on the
    prompt and padding."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab_size, (PROMPT,), generator=generator)
    lengths = [6, 3, 8, 5]
    width = PROMPT + max(lengths)
    input_ids = torch.zeros(K, width, dtype=torch.long)
    attention_mask = torch.zeros(K, width, dtype=torch.long)
    labels = torch.full((K, width), -100)
    for row, length in enumerate(lengths):
        response = torch.randint(3, vocab_size, (length,), generator=generator)
        input_ids[row, :PROMPT + length] = torch.cat([prompt, response])
        attention_mask[row, :PROMPT + length] = 1
        labels[row, PROMPT:PROMPT + length] = response
    return input_ids, attention_mask, labels


def naive_tuna_loss(model, input_ids, attention_mask, labels):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    next_labels = labels[:, 1:]
    keep = next_labels != -100
    rows = torch.arange(K)[:, None].expand_as(next_labels)
    return tuna_objective_from_logits(logits[keep].double(), next_labels[keep], rows[keep],
                                      {k: (0, k) for k in range(K)})


def gemma2_with_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
                          attn_logit_softcapping=None, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # logits large enough that the softcap bends them
        model.lm_head.weight.mul_(20)
    return model


def models(tiny_model_dir):
    yield "llama", build_tiny_llama(hidden_size=32, seed=2)
    lora = add_lora(build_tiny_llama(hidden_size=32, seed=2), r=4, alpha=32, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    yield "peft-lora", lora
    yield "qlora-4bit", add_lora(load_model(str(tiny_model_dir), load_in_4bit=True, compute_dtype="float32",
                                            trainable=True), r=4, alpha=32, dropout=0.0, target_modules="all-linear",
                                  quantized=True)
    yield "gemma2-softcap", gemma2_with_softcap()


def test_one_call_equals_the_naive_loss_and_gradients(tiny_model_dir):
    for name, model in models(tiny_model_dir):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        batch = ranked_batch(model.config.vocab_size if hasattr(model, "config") else 384)
        loss, metrics = tuna_loss(model, *batch, group_sizes=[K])
        grads = torch.autograd.grad(loss, params)
        expected = naive_tuna_loss(model, *batch)
        expected_grads = torch.autograd.grad(expected, params)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5), name
        worst = max(rel_err(g, e) for g, e in zip(grads, expected_grads))
        assert worst <= 1e-5, (name, worst)
        assert set(metrics) >= {"rank_loss", "mle_loss", "pair_accuracy"}


def test_fused_sft_loss_equals_the_model_loss_and_builds_no_logits():
    model = build_tiny_llama(vocab_size=8192, hidden_size=32, seed=4)
    input_ids, attention_mask, labels = ranked_batch(vocab_size=8192, seed=1)
    params = list(model.parameters())
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, params)
    loss = causal_lm_loss(model, input_ids, attention_mask, labels)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert max(rel_err(g, e) for g, e in zip(torch.autograd.grad(loss, params), expected_grads)) <= 1e-5

    apply_fused_losses(model)  # the one line
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert outputs.logits is None and float(outputs.loss) == pytest.approx(float(expected), rel=1e-5)
    assert model(input_ids=input_ids).logits.shape[-1] == 8192  # without labels: the model's own forward


def test_fused_sft_loss_without_a_target_is_nan_with_zero_gradients_like_the_model_loss():
    """A batch whose labels are all ignored (truncation): the model's own loss is NaN with zero gradients; so is
    the fused one, so one such step cannot turn the head into NaN."""
    model = build_tiny_llama(vocab_size=1000, hidden_size=32, seed=4)
    input_ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, -100)
    expected = model(input_ids=input_ids, labels=labels).loss
    assert torch.isnan(expected)
    loss = causal_lm_loss(model, input_ids, None, labels)
    assert torch.isnan(loss)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)


def test_fused_sft_loss_never_holds_an_eighth_of_the_logits():
    """The SFT loss is a scalar: its chunked path holds whole-vocabulary row chunks of at most two default
    tiles (2 x 1024 x 4096 fp32 = 32 MiB) whatever the number of tokens; here an eighth of the logits."""
    vocab_size, rows, width = 32000, 32, 128
    model = apply_fused_losses(build_tiny_llama(vocab_size=vocab_size, hidden_size=16, seed=4))
    input_ids = torch.randint(3, vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))
    with AllocationTracker() as tracker:
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids).loss.backward()
    logits_bytes = rows * width * vocab_size * 4
    assert tracker.largest_bytes <= min(logits_bytes / 8, 2 * 1024 * 4096 * 4), (tracker.largest_bytes, logits_bytes)


def test_bad_group_sizes_are_refused():
    model = build_tiny_llama(hidden_size=32)
    with pytest.raises(ValueError, match="group_sizes"):
        tuna_loss(model, *ranked_batch(), group_sizes=[2, 1])
