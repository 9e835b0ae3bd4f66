"""tuna generate: each record sampled from its own stream, so a run killed and resumed writes what an uninterrupted
run writes (27.10); the per-response finish reasons, kept through tuna rank (23.3)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tuna_train.model import build_tiny_llama, synthetic_tokenizer
from tuna_train.pipeline import store
from tuna_train.pipeline.generate import SeededSampling, generate_records
from tuna_train.pipeline.judge import make_judge
from tuna_train.pipeline.rank import rank_records
from tuna_train.synthetic import make_task_records


def generation_inputs(count, seed=4):
    """Instructions with task fields (the rule judge grades them), as `tuna generate` reads them."""
    return [dict(r, id=i) for i, r in enumerate(make_task_records(count, seed=seed))]


def test_resumed_generate_writes_the_records_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """27.10: a run interrupted in the middle of a batch and resumed writes byte for byte what an uninterrupted run
    with the same seed writes (the seed came from the batch, so most records differed)."""
    model, tokenizer = build_tiny_llama(hidden_size=64, seed=5), synthetic_tokenizer()
    records = generation_inputs(12)
    run = dict(num_candidates=3, template="none", max_new_tokens=6, batch_size=4, seed=11)
    generate_records(model, tokenizer, records, tmp_path / "straight.jsonl", **run)

    put, done = store.JsonlStore.put, []

    def interrupted_put(self, key, entry):  # Ctrl-C after the 7th record: in the middle of the second batch
        if len(done) == 7:
            raise KeyboardInterrupt
        put(self, key, entry)
        done.append(key)

    monkeypatch.setattr(store.JsonlStore, "put", interrupted_put)
    with pytest.raises(KeyboardInterrupt):
        generate_records(model, tokenizer, records, tmp_path / "resumed.jsonl", **run)
    monkeypatch.setattr(store.JsonlStore, "put", put)
    stats = generate_records(model, tokenizer, records, tmp_path / "resumed.jsonl", **run)
    assert stats == {"records": 12, "generated": 5}
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    other_seed = generate_records(model, tokenizer, records, tmp_path / "other.jsonl", **dict(run, seed=12))
    assert other_seed["generated"] == 12  # and the seed does decide the samples
    assert (tmp_path / "other.jsonl").read_bytes() != (tmp_path / "straight.jsonl").read_bytes()


def test_generated_records_say_which_responses_max_new_tokens_cut(tmp_path):
    """23.3: finish_reasons[j] is "stop" (EOS) or "length" (cut by max_new_tokens), and rank keeps each with its
    response. Reference: the same run with room to finish (each record's draws do not depend on the cap), where
    a response that stopped is the same and one that was cut goes on."""
    model, tokenizer = build_tiny_llama(hidden_size=64, seed=5), synthetic_tokenizer()
    with torch.no_grad():  # EOS made likely enough that a cap of 3 cuts some responses, not all (7 of 24 stop)
        model.lm_head.weight[tokenizer.eos_token_id] *= 10
    records = generation_inputs(8)
    run = dict(num_candidates=3, template="none", max_tries=1, seed=3)
    generate_records(model, tokenizer, records, tmp_path / "short.jsonl", max_new_tokens=3, **run)
    generate_records(model, tokenizer, records, tmp_path / "long.jsonl", max_new_tokens=64, **run)
    short = [json.loads(line) for line in (tmp_path / "short.jsonl").read_text().splitlines()]
    long = [json.loads(line) for line in (tmp_path / "long.jsonl").read_text().splitlines()]
    reasons = [reason for record in short for reason in record["finish_reasons"]]
    assert set(reasons) == {"stop", "length"}, reasons
    for cut, whole in zip(short, long):
        assert len(cut["finish_reasons"]) == len(cut["responses"]) == 3
        for text, reason, full_text, full_reason in zip(cut["responses"], cut["finish_reasons"], whole["responses"],
                                                        whole["finish_reasons"]):
            assert full_text.startswith(text)
            if reason == "stop":
                assert (full_text, full_reason) == (text, "stop")
            else:
                assert reason == "length"
    # with room, some of the cut responses end with EOS
    assert sum(reason == "stop" for record in long for reason in record["finish_reasons"]) > reasons.count("stop")

    rank_records(short, make_judge("rule"), tmp_path / "ranked.jsonl", include_judge_response=True)
    ranked = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert ranked
    sources = {record["id"]: record for record in short}
    for record in ranked:  # the judge's ranking names the generated responses 0..2 and its own 3
        source, order = sources[record["id"]], record["judge"]["ranking"]
        if len(record["responses"]) < len(order):  # its own response is kept only when it is not a sample
            order = [i for i in order if i < 3]
        assert record["responses"] == [source["responses"][i] if i < 3 else record["responses"][j]
                                       for j, i in enumerate(order)]
        assert record["finish_reasons"] == [source["finish_reasons"][i] if i < 3 else None for i in order]
    assert any(None in record["finish_reasons"] for record in ranked)  # the judge's own answer was generated by none


def test_seeded_sampling_draws_from_the_tempered_top_k_top_p_softmax():
    """The per-record streams sample as generate(do_sample=True) would: the argmax of the processed logits plus
    Gumbel noise is a draw of softmax(logits / temperature) restricted to top-k, then top-p."""
    logits = torch.tensor([2.0, 1.8, 1.6, 1.4, 0.0, -9.0])
    temperature, top_p, top_k, draws = 0.9, 0.8, 4, 20000  # top-k keeps 4 tokens, then top-p 3 (alone: 4 each)
    sampler = SeededSampling(temperature, top_p, seeds=[1, 2], k=draws // 2, device="cpu", top_k=top_k)
    tokens = sampler(None, logits.repeat(draws, 1)).argmax(-1)
    expected = torch.softmax(logits / temperature, -1)
    expected[torch.argsort(expected, descending=True)[top_k:]] = 0  # top-k
    expected /= expected.sum()
    order = torch.argsort(expected, descending=True)  # top-p: the smallest set whose mass reaches top_p
    before = torch.cumsum(expected[order], 0) - expected[order]
    expected[order[before >= top_p]] = 0
    expected /= expected.sum()
    observed = torch.bincount(tokens, minlength=len(logits)).double() / draws
    assert torch.allclose(observed, expected.double(), atol=0.015), (observed, expected)
    assert observed[expected == 0].sum() == 0


@pytest.mark.slow
def test_generate_killed_and_resumed_writes_the_uninterrupted_records(tmp_path, tiny_model_dir):
    """The same with a real SIGKILL of `tuna generate` (20 records, killed after its first records are stored),
    resumed with another batch size: the records do not depend on the batches they were sampled in."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in generation_inputs(20, seed=9)))
    command = [sys.executable, "-m", "tuna_train.cli", "generate", "--model", str(tiny_model_dir), "--data", str(data),
               "-k", "3", "--max-new-tokens", "24", "--batch-size", "4", "--seed", "5", "--template", "none"]
    subprocess.run(command + ["--out", str(tmp_path / "straight.jsonl")], check=True, capture_output=True)
    killed, progress = tmp_path / "killed.jsonl", tmp_path / "killed.jsonl.progress.jsonl"
    process = subprocess.Popen(command + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (progress.exists() and len(progress.read_bytes().splitlines()) >= 5):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.exists() and len(progress.read_bytes().splitlines()) < 20  # it was killed partway
    done = subprocess.run(command + ["--out", str(killed), "--batch-size", "3"], check=True, capture_output=True,
                          text=True)
    assert "'generated': 20" not in done.stdout  # it resumed
    assert killed.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
