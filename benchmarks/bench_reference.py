"""The cost of the reference pass of the listwise preference losses, on SmolLM2-135M-Instruct with LoRA (fp32,
CPU), interleaved in one process: one training step (forward + backward) of ``plackett_luce`` on G groups of
K = 4 candidates

- fused, without a reference (``tuna_hf.tuna_loss``);
- fused, ``reference="adapter"`` (the same model with its adapters off, in the same call, no gradient);
- the naive DPO-style computation: the policy's materialised logits -> log_softmax -> gather per candidate,
  then the reference's the same way under peft's ``disable_adapter()`` and ``torch.no_grad()``;

and, to compare the reference pass with, one forward of the model without gradients (``model(...)`` under
``torch.no_grad()``: what a reference pass at least costs). Every path's loss is checked against the naive one
first. Peak extra memory from the allocator events (``bench_memory.measure``).

    python benchmarks/bench_reference.py [--groups 2] [--length 96] [--rounds 3] [--json OUT]

``benchmarks/test_reference_cost.py`` runs it and asserts the acceptance: the reference pass costs less than one
extra forward of the model per step, and no weights are added in memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_memory import measure  # noqa: E402

CPU = torch.device("cpu")
CANDIDATES = 4
MODEL = "smollm2-135m-instruct"


def build(groups: int, length: int):
    """(peft model, input_ids [G*K, T], attention_mask, labels): one shared prompt per group, K responses."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuna_train.real_models import prepare

    model = AutoModelForCausalLM.from_pretrained(str(prepare(MODEL)), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter, so that the policy and the reference differ
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids = torch.randint(10, vocab, (groups * CANDIDATES, length), generator=generator)
    prompt = length // 3
    for g in range(groups):
        input_ids[g * CANDIDATES:(g + 1) * CANDIDATES, :prompt] = input_ids[g * CANDIDATES, :prompt]
    labels = input_ids.masked_fill(torch.arange(length) < prompt, -100)
    return model, input_ids, torch.ones_like(input_ids), labels


def naive_sequence_logprobs(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """[S] summed log-probabilities of each row's targets from the materialised logits (as DPO trainers do)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (token_logprobs * keep).sum(dim=1)


def paths(model, input_ids, attention_mask, labels, groups: int, beta: float) -> Dict[str, Callable[[], torch.Tensor]]:
    from tuna_hf import tuna_loss
    from tuna_kernels import RankingOptions, TunaLoss, plackett_luce_loss

    sizes = [CANDIDATES] * groups
    loss_fn = TunaLoss(loss="plackett_luce", beta=beta, alpha=0.0, mle_weight=0.0, impl="chunked")
    valid = torch.ones(groups, CANDIDATES, dtype=torch.bool)

    def naive():
        policy = naive_sequence_logprobs(model, input_ids, attention_mask, labels).view(groups, CANDIDATES)
        with torch.no_grad(), model.disable_adapter():
            reference = naive_sequence_logprobs(model, input_ids, attention_mask, labels).view(groups, CANDIDATES)
        return plackett_luce_loss(policy, valid, RankingOptions(beta=beta), ref_scores=reference)

    return {
        "fused, no reference": lambda: tuna_loss(model, input_ids, attention_mask, labels, group_sizes=sizes,
                                                 loss_fn=loss_fn)[0],
        "fused, reference='adapter'": lambda: tuna_loss(model, input_ids, attention_mask, labels, group_sizes=sizes,
                                                        loss_fn=loss_fn, reference="adapter")[0],
        "naive logits, peft disable_adapter() reference": naive,
    }


def run(groups: int = 2, length: int = 96, rounds: int = 3, beta: float = 0.1) -> dict:
    model, input_ids, attention_mask, labels = build(groups, length)
    losses = paths(model, input_ids, attention_mask, labels, groups, beta)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step_of(loss_fn):
        def step():
            for parameter in trainable:
                parameter.grad = None
            loss_fn().backward()
        return step

    def forward_only():
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)

    naive_loss = float(losses["naive logits, peft disable_adapter() reference"]())
    fused_loss = float(losses["fused, reference='adapter'"]())
    if not abs(naive_loss - fused_loss) <= 1e-4 * max(1.0, abs(naive_loss)):
        raise AssertionError(f"fused loss {fused_loss} against the naive {naive_loss}")
    steps = {name: step_of(fn) for name, fn in losses.items()}
    steps["one forward, no gradient (model(...))"] = forward_only
    for step in steps.values():  # first-call costs out of the timings
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    weights_before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peaks = {name: measure(step, CPU).peak_bytes for name, step in steps.items()}
    weights_after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"model": MODEL, "groups": groups, "candidates": CANDIDATES, "length": length, "rounds": rounds,
            "seconds": medians, "peak_mib": {name: peak / 2 ** 20 for name, peak in peaks.items()},
            "weights_mib": [weights_before / 2 ** 20, weights_after / 2 ** 20]}


def markdown(result: dict) -> str:
    base = result["seconds"]["fused, no reference"]
    lines = [f"**{result['model']}, LoRA r=16 on all linear layers, {result['groups']} groups x "
             f"{result['candidates']} candidates x {result['length']} tokens, fp32, median of {result['rounds']}**", "",
             "| path | seconds | / fused without reference | peak extra (MiB) |", "|---|---|---|---|"]
    for name, seconds in result["seconds"].items():
        lines.append(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x | {result['peak_mib'][name]:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=2, help="groups of 4 candidates (default 2)")
    parser.add_argument("--length", type=int, default=96, help="tokens per candidate row (default 96)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.groups, args.length, args.rounds)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
