"""What several test modules share: the relative error, and random log-likelihood problems with their gradients.

(A module of its own: test modules import it, never each other or conftest.)
"""

import signal
import subprocess
import time

import torch
from peft import LoraConfig, get_peft_model

from tuna_kernels import TunaLoss, token_logprobs
from tuna_train.collate import tokenize_group
from tuna_train.model import build_tiny_llama
from tuna_train.pipeline.score import as_example

#: relative error allowed against the float64 reference, per input dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = expected.norm()
    diff = (actual - expected).norm()
    return float(diff) if denom == 0 else float(diff / denom)


def make_problem(num_tokens, hidden_dim, vocab_size, with_bias, ignore_fraction, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_dim, generator=generator)
    weight = torch.randn(vocab_size, hidden_dim, generator=generator) / hidden_dim ** 0.5 * 2
    bias = torch.randn(vocab_size, generator=generator) if with_bias else None
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    labels[torch.rand(num_tokens, generator=generator) < ignore_fraction] = -100
    grad_token = torch.randn(num_tokens, generator=generator)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), labels, grad_token


def logprobs_and_grads(impl, hidden, weight, bias, labels, grad_token, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + (() if bias is None else (bias,))]
    token_lp = token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None,
                              impl=impl, **options)
    grads = torch.autograd.grad((token_lp * grad_token.to(token_lp.dtype)).sum(), leaves)
    return (token_lp,) + tuple(grads)


#: the Alpaca prompt template, written out (independent of tuna_train.templates)
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:")


def release_contextual(instruction, generations, ranking, key="rank", judge_response="1, 2, 3", **extra):
    """A raw contextual record shaped like the public release: ``instruct`` is the templated instruction,
    ``prompt`` what the judge was sent (instruct, every candidate as "###Response j:", the judge's steps)."""
    instruct = ALPACA.format(instruction)
    shown = "".join(f"\n\n###Response {j}:\n{text}" for j, text in enumerate(generations))
    record = {"prompt": instruct + shown + "\n\nWe would like to request your feedback ... rank: [...]",
              "instruct": instruct, "id": extra.pop("id", 1), "generation": list(generations),
              "gpt_eval": f"... rank: {ranking}", "rank_str": str(ranking), key: list(ranking)}
    if judge_response is not None:
        record["response_4"] = judge_response
    record.update(extra)
    return record


def naive_sums(model, tokenizer, record):
    """Each response in its own row through the full model: logits, log_softmax, gather."""
    group = tokenize_group(as_example(record), tokenizer, "alpaca", 512)
    sums, counts = [], []
    for response in group.response_ids:
        ids = torch.tensor([group.prompt_ids + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        start = len(group.prompt_ids)
        picked = [logprobs[start + i - 1, token] for i, token in enumerate(response)]
        sums.append(float(sum(picked)))
        counts.append(len(response))
    return sums, counts


# tiny Llamas with peft adapters where users put them (test_lm_head_adapters.py, test_reference.py)
def tiny(tied: bool):
    model = build_tiny_llama(vocab_size=384, hidden_size=32, seed=3)
    if tied:  # tie as transformers does for tie_word_embeddings models
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def with_adapters(model, **config):
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **config))
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at initialisation
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


def batch(seed=0, vocab_size=384):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def own_logits(model, input_ids, attention_mask, labels):
    """The model's own logits at target positions in float64, their targets and rows (independent of tuna_hf)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    rows = torch.arange(input_ids.shape[0])[:, None].expand_as(targets)
    return logits[keep].double(), targets[keep], rows[keep]


# the reference tests (test_reference.py, test_reference_model.py, test_reference_precision.py)
TARGETS = ["q_proj", "v_proj", "lm_head"]
GROUPS = [3, 1]  # rows 0-2 one instruction's candidates, best first; row 3 alone


class RecordingLoss(TunaLoss):
    """TunaLoss that keeps the reference scores it was given."""

    def forward(self, *args, ref_scores=None, **kwargs):
        self.seen_ref_scores = ref_scores
        return super().forward(*args, ref_scores=ref_scores, **kwargs)


def float64_scores(model, input_ids, attention_mask, labels):
    """[4] mean token log-prob of each row under the model's own logits, float64."""
    logits, targets, rows = own_logits(model, input_ids, attention_mask, labels)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return torch.stack([logprobs[rows == r].mean() for r in range(input_ids.shape[0])])


def sigkill_once_cached(command, cache, lines: int, deadline_seconds: float = 120) -> None:
    """Run ``command`` and SIGKILL it once its ``cache`` file holds ``lines`` lines (a command that caches each
    finished record, killed mid-run); fails if it exits first or the deadline passes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + deadline_seconds
    while not (cache.exists() and len(cache.read_text().splitlines()) >= lines):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
