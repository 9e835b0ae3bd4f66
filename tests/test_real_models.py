"""The fused losses on the real checkpoints a user fine-tunes (SmolLM2-135M-Instruct, Gemma 3 270M: tied heads,
a 262k vocabulary, real BPE tokenizers and chat templates), against a float64 forward of the same model, with
adapters where users put them (attention, MLP, the lm_head), QLoRA, and `tuna score` through the CLI.

The float64 reference computes its own cross-entropy from float64 logits (transformers' loss casts logits to
float32 even for a float64 model)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import rel_err
from tuna_hf import apply_fused_losses, causal_lm_loss, lm_head_spec, tuna_loss
from tuna_train.model import add_lora, load_model, load_tokenizer

pytestmark = pytest.mark.real_model

CHATS = [
    ("Name a colour of the sky.", ["Blue.", "The sky is usually blue on a clear day.", "Green, like grass."]),
    ("What is 2 + 3?", ["5", "2 + 3 equals 5.", "It is 23."]),
]
ADAPTER_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"]


def chat_batch(tokenizer):
    """Rows of [chat prompt, response, end of turn], right-padded; labels -100 on prompt and padding; one group
    per instruction, best first."""
    rows, prompt_lengths = [], []
    for instruction, responses in CHATS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for response in responses:
            rows.append(prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"] +
                        [tokenizer.eos_token_id])
            prompt_lengths.append(len(prompt_ids))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, (ids, start) in enumerate(zip(rows, prompt_lengths)):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        labels[r, start:len(ids)] = torch.tensor(ids[start:])
    return input_ids, attention_mask, labels, [len(r) for _, r in CHATS]


def float64_token_logprobs(model, input_ids, attention_mask, labels):
    """[N] log-probabilities of every target under the model's own logits, in float64, and each target's row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    targets = labels[:, 1:]
    keep = targets != -100
    logprobs = torch.log_softmax(logits[keep], dim=-1).gather(1, targets[keep][:, None]).squeeze(1)
    rows = torch.arange(input_ids.shape[0])[:, None].expand_as(targets)[keep]
    return logprobs, rows


def float64_tuna_loss(model, input_ids, attention_mask, labels, group_sizes, margin=0.1):
    """The Tuna objective written from the method: mean token log-prob scores, the per-gap mean hinge over pairs,
    plus the mean token cross-entropy over all candidates."""
    logprobs, rows = float64_token_logprobs(model, input_ids, attention_mask, labels)
    scores = torch.stack([logprobs[rows == r].mean() for r in range(input_ids.shape[0])])
    rank_loss, start = 0.0, 0
    groups = []
    for size in group_sizes:
        groups.append(scores[start:start + size])
        start += size
    for gap in range(1, max(group_sizes)):
        hinges = [torch.clamp(g[j + gap] - g[j] + margin * gap, min=0) for g in groups for j in range(len(g) - gap)]
        rank_loss = rank_loss + torch.stack(hinges).mean()
    return rank_loss - logprobs.mean()


def grads_of(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    directory = request.getfixturevalue(f"{request.param}_dir")
    return request.param, load_model(str(directory)), load_tokenizer(str(directory))


def test_fused_losses_match_a_float64_forward(real):
    """Full fine-tuning: loss within 1e-6 and every parameter's gradient within 1e-4 of the float64 model's."""
    name, model, tokenizer = real
    input_ids, attention_mask, labels, sizes = chat_batch(tokenizer)
    reference = copy.deepcopy(model).double()
    params, ref_params = list(model.parameters()), list(reference.parameters())

    cases = {
        "tuna_loss": (lambda m: tuna_loss(m, input_ids, attention_mask, labels, group_sizes=sizes)[0],
                      lambda m: float64_tuna_loss(m, input_ids, attention_mask, labels, sizes)),
        "causal_lm_loss": (lambda m: causal_lm_loss(m, input_ids, attention_mask, labels),
                           lambda m: -float64_token_logprobs(m, input_ids, attention_mask, labels)[0].mean()),
    }
    for case, (fused_fn, reference_fn) in cases.items():
        expected = reference_fn(reference)
        expected_grads = grads_of(expected, ref_params)
        loss = fused_fn(model)
        grads = grads_of(loss, params)
        assert rel_err(loss, expected) <= 1e-6, (name, case, float(loss), float(expected))
        worst = max(rel_err(g, e) for g, e in zip(grads, expected_grads))
        assert worst <= 1e-4, (name, case, worst)

    patched = apply_fused_losses(copy.deepcopy(model))
    outputs = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert outputs.logits is None
    assert rel_err(outputs.loss, cases["causal_lm_loss"][1](reference)) <= 1e-6


def test_adapters_on_attention_mlp_and_the_lm_head_give_the_model_own_loss(real):
    """peft LoRA where users put it, the lm_head included (tied to the embedding on both models): the fused loss and
    every adapter gradient equal those of the model's own forward (both in float64) to 1e-5."""
    name, model, tokenizer = real
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=ADAPTER_TARGETS))
    with torch.no_grad():  # a trained-looking adapter (lora_B starts at zero)
        generator = torch.Generator().manual_seed(0)
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    assert len(lm_head_spec(peft_model).adapters) == 1
    input_ids, attention_mask, labels, _ = chat_batch(tokenizer)
    # both in float64: what is compared is the adapter arithmetic, not fp32 noise of the body (1e-5 of it on Gemma)
    peft_model.double()
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    expected = -float64_token_logprobs(peft_model, input_ids, attention_mask, labels)[0].mean()
    expected_grads = grads_of(expected, params)
    loss = causal_lm_loss(peft_model, input_ids, attention_mask, labels)
    grads = grads_of(loss, params)
    assert rel_err(loss, expected) <= 1e-5, (name, float(loss), float(expected))
    for (param_name, _), grad, want in zip(named, grads, expected_grads):
        assert rel_err(grad, want) <= 1e-5, (name, param_name, rel_err(grad, want))
    assert any("lm_head.lora_B" in n for n, _ in named)


def test_qlora_4bit_lora_gradients_match_the_model_own_forward(smollm2_dir):
    """QLoRA on CPU on SmolLM2 (NF4 base, LoRA everywhere but the head): loss and LoRA gradients equal those of
    the same quantised model's own forward."""
    model = add_lora(load_model(str(smollm2_dir), load_in_4bit=True, compute_dtype="float32", trainable=True),
                     r=4, alpha=32, dropout=0.0, target_modules="all-linear", quantized=True)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    input_ids, attention_mask, labels, _ = chat_batch(load_tokenizer(str(smollm2_dir)))
    params = [p for p in model.parameters() if p.requires_grad]
    expected = -float64_token_logprobs(model, input_ids, attention_mask, labels)[0].mean()
    expected_grads = grads_of(expected, params)
    loss = causal_lm_loss(model, input_ids, attention_mask, labels)
    assert rel_err(loss, expected) <= 1e-5
    assert max(rel_err(g, e) for g, e in zip(grads_of(loss, params), expected_grads)) <= 1e-5


def test_tuna_score_matches_an_independent_float64_mean_logprob(smollm2_dir, tmp_path):
    """`tuna score --teacher smollm2-135m-instruct --template chat`: each response's mean token log-prob (EOS
    included) within 1e-4 of a float64 forward of the prompt + response, and the same ranking."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "output": r}) + "\n" for i, r in CHATS))
    out = tmp_path / "scored.jsonl"
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "score", "--teacher", "smollm2-135m-instruct",
                           "--data", str(data), "--out", str(out), "--template", "chat"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = [json.loads(line) for line in out.read_text().splitlines()]

    tokenizer = load_tokenizer(str(smollm2_dir))
    reference = load_model(str(smollm2_dir)).double().eval()
    for record, (instruction, responses) in zip(scored, CHATS):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = []
        for response in responses:
            ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = reference(input_ids=torch.tensor([ids])).logits[0, :-1]
            logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
            expected.append(float(logprobs[len(prompt_ids) - 1:].mean()))
        assert record["scores"] == pytest.approx(expected, abs=1e-4), (record["scores"], expected)
        assert record["ranking"] == sorted(range(len(expected)), key=lambda i: -expected[i])
