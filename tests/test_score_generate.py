"""tuna score (fused teacher log-likelihoods) against a naive materialised-logits computation; tuna generate
(diversity rule, resumable); both outputs readable by tuna train."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import naive_sums
from tuna_train.data import load_ranked
from tuna_train.pipeline.generate import generate_records, max_pairwise_rouge_l
from tuna_train.pipeline.score import score_with_model
from tuna_train.synthetic import correct_answer, make_records


@pytest.fixture
def teacher_dir(tiny_model_dir):
    return tiny_model_dir


def test_score_matches_naive_logits(teacher_dir):
    from tuna_train.model import load_model, load_tokenizer

    model, tokenizer = load_model(str(teacher_dir)), load_tokenizer(str(teacher_dir))
    records = make_records(6, seed=2)
    records[1]["responses"] = records[1]["responses"][:2]
    scored = score_with_model(model, tokenizer, records, token_budget=700)  # several batches
    for record, result in zip(records, scored):
        sums, counts = naive_sums(model, tokenizer, record)
        assert result["teacher"]["tokens"] == counts
        for got, want in zip(result["teacher"]["sum"], sums):
            assert abs(got - want) <= 1e-5 * abs(want)
        means = [s / c for s, c in zip(sums, counts)]
        for got, want in zip(result["scores"], means):
            assert abs(got - want) <= 1e-5 * abs(want)
        assert result["ranking"] == sorted(range(len(means)), key=lambda i: -means[i])


def test_score_cli_output_trains(teacher_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "scores"}) + "\n"
                            for r in make_records(5, seed=3)))
    out = tmp_path / "scored.jsonl"
    subprocess.run([sys.executable, "-m", "tuna_train.cli", "score", "--teacher", str(teacher_dir), "--data",
                    str(data), "--out", str(out)], check=True, capture_output=True)
    examples, report = load_ranked(str(out))
    assert report.loaded == 5 and report.data_format == "native"
    assert all(e.scores == sorted(e.scores, reverse=True) for e in examples)


def test_generate_is_diverse_resumable_and_readable(teacher_dir, tmp_path):
    from tuna_train.model import load_model, load_tokenizer

    model, tokenizer = load_model(str(teacher_dir)), load_tokenizer(str(teacher_dir))
    instructions = [dict({k: v for k, v in r.items() if k not in ("responses", "scores")}, id=i)
                    for i, r in enumerate(make_records(5, seed=4))]
    out = tmp_path / "generated.jsonl"
    stats = generate_records(model, tokenizer, instructions[:3], out, k=3, max_new_tokens=6, batch_size=2)
    assert stats == {"records": 3, "generated": 3}
    stats = generate_records(model, tokenizer, instructions, out, k=3, max_new_tokens=6, batch_size=2)
    assert stats == {"records": 5, "generated": 2}  # the first three came from the progress file
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(generated) == 5 and all(len(g["responses"]) == 3 for g in generated)
    for g in generated:
        assert g["generation"]["max_rouge_l"] == pytest.approx(max_pairwise_rouge_l(g["responses"]))
        assert 1 <= g["generation"]["tries"] <= 3


def test_rouge_l_rule():
    assert max_pairwise_rouge_l(["the cat sat", "the cat sat", "a dog"]) == pytest.approx(1.0)
    assert max_pairwise_rouge_l(["the cat sat", "a dog ran", "birds fly"]) == pytest.approx(0.0)


#: the pipeline's default stages at about half their data (70 s instead of 2 min 40 s on 2 cores); the default
#: itself, over three seeds, is measured by benchmarks/test_pipeline_default.py
SMALLER_PIPELINE = ["--sft-examples", "1500", "--synthetic-examples", "1600", "--contextual-examples", "320",
                    "--eval-examples", "160"]


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path):
    """`tuna pipeline` on the built-in tasks: every stage, accuracy after each stage; a second run skips every
    finished stage and recomputes the same evaluations."""
    command = [sys.executable, "-m", "tuna_train.cli", "pipeline", *SMALLER_PIPELINE]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "runs" / "pipeline"
    summary = json.loads((root / "summary.json").read_text())
    accuracy = summary["pair_accuracy"]
    assert accuracy["before"] >= 0.7  # the start model (sft stage) already follows the task
    assert accuracy["after_tuna_p"] >= 0.7 and accuracy["after_tuna_c"] is not None
    stages = summary["stages"]
    assert stages["score"]["status"] == "skipped"
    assert all(stages[s]["status"] == "done" for s in ("sft", "train_p", "generate", "rank", "train_c"))
    for name in ("generated.jsonl", "ranked.jsonl"):
        [json.loads(line) for line in (root / name).read_text().splitlines()]
    examples, report = load_ranked(str(root / "ranked.jsonl"))  # Tuna_c data as tuna train reads it
    assert report.loaded > 0
    # the rule judge's own answer is a candidate (its best) where no sample is right: every group's best is right
    assert all(e.responses[0] == correct_answer(e.instruction) for e in examples)
    # template auto: the pipeline's own tiny start model is trained and evaluated without the Alpaca wrapper
    assert all(json.loads((root / stage / "config.json").read_text())["template"] == "none"
               for stage in ("sft", "train_p", "train_c"))
    evaluations = summary["eval"]  # tuna eval ranking + generation of the starting model and each stage
    assert set(evaluations) == {"start", "tuna_p", "tuna_c"}
    assert evaluations["start"]["pair_accuracy"] >= 0.7  # the start model is instruction-tuned (sft stage)
    assert all(evaluations[name]["rouge_l"] is not None for name in evaluations)
    assert all(evaluations[name]["exact_match"] is not None for name in evaluations)
    assert "| exact_match |" in (root / "eval" / "comparison.md").read_text()
    assert (root / "eval" / "comparison.png").stat().st_size > 1000
    # evaluation instructions never occur in a training stage
    trained = {r["instruction"] for name in ("sft.jsonl", "data_p.jsonl", "instructions.jsonl")
               for r in map(json.loads, (root / name).read_text().splitlines())}
    assert not trained & {json.loads(line)["instruction"] for line in (root / "eval.jsonl").read_text().splitlines()}

    # a second run skips every finished stage; with the evaluations removed, it recomputes the same numbers
    shutil.rmtree(root / "eval")
    metrics_before = (root / "train_p" / "metrics.jsonl").read_text()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (root / "train_p" / "metrics.jsonl").read_text() == metrics_before  # nothing retrained
    rerun = json.loads((root / "summary.json").read_text())
    assert rerun["pair_accuracy"] == accuracy and rerun["eval"] == evaluations

    # other settings on the same run directory: refused before any stage, naming what changed
    changed = subprocess.run(command + ["--num-candidates", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert changed.returncode != 0 and "num_candidates: 4 -> 3" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert (root / "train_p" / "metrics.jsonl").read_text() == metrics_before


def generation_inputs(count, seed=4):
    """Instructions with task fields (the rule judge grades them), as `tuna generate` reads them."""
    from tuna_train.synthetic import make_task_records

    return [dict(r, id=i) for i, r in enumerate(make_task_records(count, seed=seed))]


def test_resumed_generate_writes_the_records_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """27.10: a run interrupted in the middle of a batch and resumed writes byte for byte what an uninterrupted run
    with the same seed writes (the seed was the record's place in the pending list, so 35 of 40 differed)."""
    from tuna_train.model import build_tiny_llama, synthetic_tokenizer
    from tuna_train.pipeline import store

    model, tokenizer = build_tiny_llama(hidden_size=64, seed=5), synthetic_tokenizer()
    records = generation_inputs(12)
    run = dict(k=3, template="none", max_new_tokens=6, batch_size=4, seed=11)
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
    import torch

    from tuna_train.model import build_tiny_llama, synthetic_tokenizer
    from tuna_train.pipeline.judge import make_judge
    from tuna_train.pipeline.rank import rank_records

    model, tokenizer = build_tiny_llama(hidden_size=64, seed=5), synthetic_tokenizer()
    with torch.no_grad():  # EOS made likely enough that a cap of 3 cuts some responses, not all (7 of 24 stop)
        model.lm_head.weight[tokenizer.eos_token_id] *= 10
    records = generation_inputs(8)
    run = dict(k=3, template="none", max_tries=1, seed=3)
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
    import torch

    from tuna_train.pipeline.generate import SeededSampling

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
