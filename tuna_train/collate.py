"""Tokenisation and packing of ranked groups into model inputs, in two layouts with the same result.

- ``per_candidate``: one row per candidate, ``[prompt, response, EOS]``, right padding (as the reference
  code lays out its batches).
- ``shared``: one row per group, ``[prompt, response_1, ..., response_K]``: the prompt is computed once.
  A 4D boolean mask lets each response token see the prompt and the earlier tokens of its own response,
  and position ids restart at the prompt length for every response, so each response's log-likelihood
  is the same as in its own row. The last prompt position predicts the first token of every response.

Either way only the positions that predict a target token are named (``target_positions``, flat indices
into the [rows x length] hidden states); the model runs no lm_head on prompt or padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from tuna_hf.batch import PackedBatch
from tuna_kernels import GroupLayout

from .data import RankedExample

LAYOUTS = ("shared", "per_candidate")


@dataclass
class TokenizedGroup:
    """One instruction tokenised: prompt ids, and each candidate's response ids (EOS included), best first."""

    prompt_ids: List[int]
    response_ids: List[List[int]]
    scores: List[float]
    prompt_truncated: bool = False
    responses_truncated: int = 0
    ref_scores: Optional[List[float]] = None


def pad_id_of(tokenizer) -> int:
    """The id padding positions hold: the tokenizer's pad token, else 0. Padding is never a target and never
    attended to, so any id in the vocabulary gives the same results; the one fallback of every stage."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def tokenize_group(example: RankedExample, tokenizer, template: str, max_length: int,
                   max_candidates: Optional[int] = None) -> TokenizedGroup:
    """Prompt and responses of one example; each candidate (prompt + response + EOS) fits ``max_length``.

    Responses are truncated on the right (the reference code's rule). A prompt that leaves no room for a
    single response token keeps its last ``max_length - 1`` tokens (the part next to the response).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every response ends with one")
    prompt_ids = list(tokenizer(example.prompt_text(template, tokenizer), add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True):
        if not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id:
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    prompt_truncated = len(prompt_ids) > max_length - 1
    if prompt_truncated:
        prompt_ids = prompt_ids[-(max_length - 1):]
    budget = max_length - len(prompt_ids)
    responses = example.responses[:max_candidates] if max_candidates else example.responses
    response_ids, truncated = [], 0
    for text in responses:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        if len(ids) > budget:
            ids, truncated = ids[:budget], truncated + 1
        response_ids.append(ids)
    ref_scores = None if example.ref_scores is None else list(example.ref_scores[:len(responses)])
    return TokenizedGroup(prompt_ids, response_ids, list(example.scores[:len(responses)]), prompt_truncated, truncated,
                          ref_scores)


def pack(groups: Sequence[TokenizedGroup], layout: str = "shared", pad_id: int = 0) -> PackedBatch:
    """Pack tokenised groups into one batch in ``layout`` ("shared" or "per_candidate")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not groups:
        raise ValueError("pack() needs at least one group")
    rows, positions, spans = [], [], []  # spans: per row, list of (start, length) of each response
    targets, labels, seq_index = [], [], []
    seq_group, seq_rank = [], []
    seq = 0
    for g, group in enumerate(groups):
        prompt_len = len(group.prompt_ids)
        for k, response in enumerate(group.response_ids):
            seq_group.append(g)
            seq_rank.append(k)
        if layout == "per_candidate":
            for k, response in enumerate(group.response_ids):
                row = len(rows)
                rows.append(group.prompt_ids + response)
                positions.append(list(range(prompt_len + len(response))))
                for i, token in enumerate(response):
                    targets.append((row, prompt_len + i - 1))
                    labels.append(token)
                    seq_index.append(seq + k)
        else:
            row = len(rows)
            ids, pos, row_spans = list(group.prompt_ids), list(range(prompt_len)), []
            for k, response in enumerate(group.response_ids):
                start = len(ids)
                row_spans.append((start, len(response)))
                for i, token in enumerate(response):
                    targets.append((row, prompt_len - 1 if i == 0 else start + i - 1))
                    labels.append(token)
                    seq_index.append(seq + k)
                ids += response
                pos += list(range(prompt_len, prompt_len + len(response)))
            rows.append(ids)
            positions.append(pos)
            spans.append((prompt_len, row_spans))
        seq += len(group.response_ids)

    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, pos) in enumerate(zip(rows, positions)):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        position_ids[r, :len(pos)] = torch.tensor(pos)
    if layout == "per_candidate":
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, ids in enumerate(rows):
            attention_mask[r, :len(ids)] = 1
    else:
        attention_mask = _shared_mask(spans, [len(r) for r in rows], length)

    num_groups = len(groups)
    num_candidates = max(len(g.response_ids) for g in groups)
    target_scores = torch.zeros(num_groups, num_candidates, dtype=torch.float64)
    for g, group in enumerate(groups):
        target_scores[g, :len(group.scores)] = torch.tensor(group.scores, dtype=torch.float64)
    ref_scores = None
    if all(group.ref_scores is not None for group in groups):
        ref_scores = torch.zeros(num_groups, num_candidates, dtype=torch.float64)
        for g, group in enumerate(groups):
            ref_scores[g, :len(group.ref_scores)] = torch.tensor(group.ref_scores, dtype=torch.float64)
    index = torch.tensor(seq_index, dtype=torch.long)
    group_layout = GroupLayout(index, torch.tensor(seq_group), torch.tensor(seq_rank), num_groups, num_candidates,
                               target_scores=target_scores)
    per_candidate_tokens = sum(len(g.prompt_ids) * len(g.response_ids) + sum(map(len, g.response_ids)) for g in groups)
    real_tokens = sum(len(r) for r in rows)
    stats = {
        "groups": num_groups, "sequences": seq, "targets": len(labels), "tokens": real_tokens,
        "padded_tokens": len(rows) * length, "tokens_saved": per_candidate_tokens - real_tokens,
        "prompts_truncated": sum(g.prompt_truncated for g in groups),
        "responses_truncated": sum(g.responses_truncated for g in groups),
        "groups_truncated": sum(bool(g.prompt_truncated or g.responses_truncated) for g in groups),
    }
    flat = torch.tensor([r * length + p for r, p in targets], dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, position_ids, flat, torch.tensor(labels, dtype=torch.long),
                       group_layout, stats, ref_scores)


def padded_tokens(groups: Sequence[TokenizedGroup], layout: str = "shared") -> int:
    """The tokens :func:`pack` lays out for ``groups``, padding included (rows x the longest row; its
    ``stats["padded_tokens"]``), without packing: shared = one row per group (prompt, then every response),
    per_candidate = one row per candidate (prompt + response)."""
    rows = [len(g.prompt_ids) + sum(map(len, g.response_ids)) for g in groups] if layout == "shared" else \
        [len(g.prompt_ids) + len(r) for g in groups for r in g.response_ids]
    return len(rows) * max(rows, default=0)


def split_by_tokens(groups: Sequence[TokenizedGroup], layout: str, budget: int) -> List[List[TokenizedGroup]]:
    """``groups`` in consecutive pieces of whole groups, each packing to at most ``budget`` padded tokens
    (:func:`padded_tokens`); a group over the budget alone is a piece of its own. ``budget`` 0: one piece."""
    pieces: List[List[TokenizedGroup]] = []
    for group in groups:
        if pieces and budget and padded_tokens(pieces[-1] + [group], layout) > budget:
            pieces.append([group])
        elif pieces:
            pieces[-1].append(group)
        else:
            pieces.append([group])
    return pieces


def _shared_mask(spans, row_lengths: List[int], length: int) -> torch.Tensor:
    """[R, 1, L, L] bool, True = may attend: prompt causal; each response sees the prompt and its own
    earlier tokens; padding positions see only themselves (no fully masked row, so no NaN)."""
    mask = torch.zeros((len(spans), 1, length, length), dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for r, (prompt_len, row_spans) in enumerate(spans):
        mask[r, 0, :prompt_len, :prompt_len] = causal[:prompt_len, :prompt_len]
        for start, span in row_spans:
            end = start + span
            mask[r, 0, start:end, :prompt_len] = True
            mask[r, 0, start:end, start:end] = causal[:span, :span]
        pad = torch.arange(row_lengths[r], length)
        mask[r, 0, pad, pad] = True
    return mask
