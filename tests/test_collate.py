"""Packing: the one-row-per-candidate and the prefix-shared layouts give the same log-likelihoods, loss
and gradients on a tiny model; truncation is explicit and counted."""

import pytest
import torch

from helpers import rel_err
from tuna_hf.model import lm_head_spec, target_hidden_states
from tuna_kernels import TunaLoss, sequence_logprobs
from tuna_train.collate import pack, tokenize_group
from tuna_train.data import RankedExample, examples_from_records
from tuna_train.model import build_tiny_llama, synthetic_tokenizer
from tuna_train.synthetic import make_records


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer()


def groups_of(tokenizer, num=5, seed=3):
    examples = examples_from_records(make_records(num, seed=seed))
    examples[1].responses = examples[1].responses[:2]  # ragged: a group of 2 candidates
    examples[1].scores = examples[1].scores[:2]
    return [tokenize_group(e, tokenizer, "alpaca", 512) for e in examples]


def mean_logprobs(model, batch):
    hidden = target_hidden_states(model, batch)
    head = lm_head_spec(model)
    sums, counts = sequence_logprobs(hidden, head.weight, batch.labels, batch.layout.seq_index,
                                     batch.layout.num_seqs, impl="chunked")
    return sums / counts


def loss_and_grads(model, batch):
    model.zero_grad()
    scores = mean_logprobs(model, batch)
    hidden = target_hidden_states(model, batch)
    head = lm_head_spec(model)
    loss, _ = TunaLoss(impl="chunked")(hidden, head.weight, batch.labels, batch.layout)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return scores.detach(), loss.detach(), grads


def test_layouts_give_same_logprobs_loss_and_gradients(tokenizer):
    model = build_tiny_llama(hidden_size=64, seed=1)
    groups = groups_of(tokenizer)
    per_candidate = pack(groups, "per_candidate")
    shared = pack(groups, "shared")
    assert shared.input_ids.shape[0] == 5 and per_candidate.input_ids.shape[0] == 4 * 4 + 2
    assert torch.equal(shared.labels, per_candidate.labels)
    assert shared.stats["tokens_saved"] == sum(len(g.prompt_ids) * (len(g.response_ids) - 1) for g in groups)
    scores_a, loss_a, grads_a = loss_and_grads(model, per_candidate)
    scores_b, loss_b, grads_b = loss_and_grads(model, shared)
    assert rel_err(scores_b, scores_a) <= 1e-5
    assert rel_err(loss_b, loss_a) <= 1e-5
    for name in grads_a:
        assert rel_err(grads_b[name], grads_a[name]) <= 1e-5, name


def test_shared_layout_really_isolates_responses(tokenizer):
    """A plain causal mask over the shared row (responses seeing each other) changes the scores."""
    model = build_tiny_llama(hidden_size=64, seed=1)
    shared = pack(groups_of(tokenizer), "shared")
    with torch.no_grad():
        isolated = mean_logprobs(model, shared)
        shared.attention_mask = torch.ones_like(shared.attention_mask).tril()
        leaky = mean_logprobs(model, shared)
    assert float((leaky - isolated).abs().max()) > 1e-3  # exact layouts agree to ~1e-6


def test_target_positions_point_at_the_predicting_token(tokenizer):
    group = tokenize_group(RankedExample("Say ab.", ["ab", "b"], [1.0, 0.0]), tokenizer, "none", 64)
    prompt_len = len(group.prompt_ids)
    per_candidate = pack([group], "per_candidate")
    # in its own row, the token after each target position is the label
    assert torch.equal(per_candidate.input_ids.reshape(-1)[per_candidate.target_positions + 1], per_candidate.labels)
    shared = pack([group], "shared")
    first_of_second = len(group.response_ids[0])
    # the last prompt token predicts the first token of both responses; later tokens their successor
    assert shared.target_positions[[0, first_of_second]].tolist() == [prompt_len - 1, prompt_len - 1]
    later = [i for i in range(len(shared.labels)) if i not in (0, first_of_second)]
    flat_ids = shared.input_ids.reshape(-1)
    assert torch.equal(flat_ids[shared.target_positions[later] + 1], shared.labels[later])
    assert torch.equal(flat_ids[prompt_len + torch.tensor([0, first_of_second])], shared.labels[[0, first_of_second]])


def test_truncation_is_explicit_and_counted(tokenizer):
    example = RankedExample("Write a lot.", ["x" * 100, "y" * 3], [1.0, 0.0])
    group = tokenize_group(example, tokenizer, "none", max_length=40)
    assert all(len(group.prompt_ids) + len(r) <= 40 for r in group.response_ids)
    assert group.responses_truncated == 1 and not group.prompt_truncated
    long_prompt = tokenize_group(RankedExample("p" * 100, ["ok"], [0.0]), tokenizer, "none", max_length=20)
    assert long_prompt.prompt_truncated and len(long_prompt.prompt_ids) == 19 and len(long_prompt.response_ids[0]) == 1
    batch = pack([group, long_prompt], "shared")
    assert batch.stats["responses_truncated"] == 2 and batch.stats["prompts_truncated"] == 1
