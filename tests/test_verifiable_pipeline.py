"""Issue 24 points 4-5: ``tuna pipeline`` with ``instructions: verifiable`` (the task set built in the run
directory, Tuna_c on the start model's own samples ranked by the checkers, IFEval's figures on both held-out
splits in the eval report and plot) and the training controls (``controls: [random_judge, best_only]``).

The fast tests run the stages with the built-in tiny Llama as start model; the ``real_model`` one runs
configs/smollm2_verifiable.yaml at tiny sizes, killed (SIGKILL) in a stage and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable")

from tuna_train import cli
from tuna_train.pipeline import workflow
from tuna_train.pipeline.store import read_jsonl
from tuna_train.pipeline.training_controls import best_only, random_ranking
from tuna_train.trainer import Trainer
from tuna_train.verifiable import checks, tasks
from tuna_train.verifiable.pipeline import HELDOUT_SPLITS, write_pipeline_task_set
from train_runs import ctrl_c_in_stage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_verifiable.yaml"
TINY_STAGE = ("{max_steps: %d, batch_groups: 2, tiny_hidden_size: 32, progress: false, eval_controls: false, "
              "eval_every: 0, eval_fraction: 0.0, mle_on: best, skip_ties: true}")


def ranked_group(key, scores):
    """A ranked record as tuna rank writes it: candidates best first, with per-candidate fields."""
    return {"id": key, "instruction": f"do {key}", "responses": [f"{key} answer {i}" for i in range(len(scores))],
            "finish_reasons": [f"reason {i}" for i in range(len(scores))],
            "constraint_results": [[{"id": "x", "strict": i}] for i in range(len(scores))],
            "ranking": list(range(len(scores))), "scores": scores}


def untied(record):
    return {(a, b) for (i, a), (j, b) in combinations(enumerate(record["responses"]), 2)
            if record["scores"][i] != record["scores"][j]}


def test_random_ranking_keeps_the_scores_and_ties_and_shuffles_whole_candidates():
    records = [ranked_group(f"r{n}", [1.0, 1.0, 0.5, 0.0]) for n in range(40)] + [ranked_group("one", [0.0])]
    shuffled = random_ranking(records, seed=3)
    assert random_ranking(records, seed=3) == shuffled  # seeded: a rerun (a resumed stage) gets the same data
    assert random_ranking(records, seed=4) != shuffled
    moved = 0
    for before, after in zip(records, shuffled):
        assert after["scores"] == before["scores"] and after["ranking"] == before["ranking"]
        assert sorted(after["responses"]) == sorted(before["responses"])
        # each candidate keeps its own finish reason and checks (they moved together)
        order = [before["responses"].index(text) for text in after["responses"]]
        assert after["finish_reasons"] == [before["finish_reasons"][i] for i in order]
        assert after["constraint_results"] == [before["constraint_results"][i] for i in order]
        assert len(untied(after)) == len(untied(before))  # as many pairs in the loss as Tuna_c has
        moved += after["responses"][0] != before["responses"][0]
    # the best place holds a random candidate: another one about 3 times in 4 (40 groups of 4)
    assert 15 <= moved <= 40
    assert shuffled[-1]["responses"] == records[-1]["responses"]


def test_best_only_keeps_each_groups_first_candidate_as_a_one_candidate_group():
    records = [ranked_group("a", [1.0, 0.5, 0.0]), ranked_group("b", [0.0, 0.0])]
    kept = best_only(records)
    assert [r["responses"] for r in kept] == [["a answer 0"], ["b answer 0"]]
    assert all(r["scores"] == [0.0] and "ranking" not in r and len(r["finish_reasons"]) == 1 for r in kept)
    assert records[0]["responses"] == ["a answer 0", "a answer 1", "a answer 2"]  # the input is not changed


def test_tie_counts_against_a_hand_count():
    records = [ranked_group("a", [1.0, 1.0, 0.5, 0.0]), ranked_group("b", [0.0, 0.0, 0.0]),
               {"responses": ["x", "y"], "ranking": [0, 1]}]
    assert workflow.tie_counts(records) == {"pairs": 6 + 3 + 1, "untied_pairs": 5 + 0 + 1, "tied_groups": 1}


def test_pipeline_task_set_sizes_splits_and_word_budget(tmp_path):
    paths = write_pipeline_task_set(tmp_path, seed=5, train_size=500, heldout_size=90, max_new_tokens=40)
    splits = {name: read_jsonl(str(path)) for name, path in paths.items()}
    assert [len(splits[name]) for name in ("train",) + HELDOUT_SPLITS] == [500, 90, 90]
    train_bases = {r["base_instruction"] for r in splits["train"]}
    assert len(train_bases) > 100  # shuffled before the cut: not the first tasks' instructions only
    for split in HELDOUT_SPLITS:
        assert not train_bases & {r["base_instruction"] for r in splits[split]}
    trained_kinds = {c["id"] for r in splits["train"] for c in r["constraints"]}
    assert not trained_kinds & set(tasks.UNSEEN_KINDS)
    assert {c["id"] for r in splits["heldout_unseen"] for c in r["constraints"]} <= set(tasks.UNSEEN_KINDS)
    for record in splits["train"] + splits["heldout"]:
        checks.validate(record["constraints"])
        for spec in record["constraints"]:
            if spec["id"] == "length_constraints:number_words" and spec["kwargs"]["relation"] == "at least":
                assert spec["kwargs"]["num_words"] <= 30  # 0.75 words per token of 40
    again = write_pipeline_task_set(tmp_path / "again", seed=5, train_size=500, heldout_size=90, max_new_tokens=40)
    assert all(again[name].read_bytes() == paths[name].read_bytes() for name in paths)


def test_the_config_file_loads_and_the_controls_flag_is_checked(capsys, tmp_path):
    config = workflow.load_pipeline_config(str(CONFIG))
    assert (config.instructions, config.judge, config.tuna_p, config.controls, config.num_candidates) == \
        ("verifiable", "verifiable", False, ["random_judge", "best_only"], 4)
    assert config.prompt_template == "chat" and config.train_c["lora"] and config.train_c["mle_on"] == "best"
    assert workflow.load_pipeline_config(None, {"controls": "best_only,random_judge"}).controls == \
        ["best_only", "random_judge"]
    for flags, named in ((["--controls", "random_judge,sft"], "controls"),
                         (["--controls", "best_only,best_only"], "controls"),
                         (["--instructions", "verifiable"], "judge"),
                         (["--tuna-p", "false", "--sft-examples", "0"], "tuna_p")):
        assert cli.main(["pipeline", "--output-dir", str(tmp_path / "never")] + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"'{named}'" in err[0], err
    assert not (tmp_path / "never").exists()


def tiny_flags(root, controls="random_judge,best_only"):
    return ["pipeline", "--output-dir", str(root), "--instructions", "verifiable", "--judge", "verifiable",
            "--tuna-p", "false", "--controls", controls, "--sft-examples", "16", "--contextual-examples", "6",
            "--eval-examples", "3", "--num-candidates", "3", "--max-new-tokens", "6", "--max-tries", "1",
            "--sft", TINY_STAGE % 2, "--train-c", TINY_STAGE % 3]



def test_verifiable_pipeline_trains_the_controls_on_tuna_cs_data_and_resumes(tmp_path, monkeypatch, capsys):
    root = tmp_path / "run"
    monkeypatch.setattr(workflow, "Trainer", ctrl_c_in_stage("control_random_judge"))
    assert cli.main(tiny_flags(root)) == 3
    assert "stage control_random_judge stopped at step 1 of 3" in capsys.readouterr().err
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert stages["train_p"]["status"] == "skipped" and stages["train_c"]["status"] == "done"
    assert stages["control_random_judge"]["status"] == "partial" and "eval_start" not in stages
    ranked_before = (root / "ranked.jsonl").read_bytes()

    monkeypatch.setattr(workflow, "Trainer", Trainer)
    assert cli.main(tiny_flags(root)) == 0
    out = capsys.readouterr().out
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert (root / "ranked.jsonl").read_bytes() == ranked_before  # generate and rank were not run again
    assert json.loads((root / "control_random_judge" / "summary.json").read_text())["resumed_from_step"] == 1
    names = ("start", "tuna_c", "random_judge", "best_only")
    assert all(stages[f"eval_{name}"]["status"] == "done" for name in names)
    assert stages["rank"]["records"] == 6 and stages["rank"]["pairs"] == 6 * 3
    # the controls' data are Tuna_c's (the ranked groups, and with the built-in start model as many of its
    # supervised examples): the same groups, the random one with the same scores (so the same pairs)
    ranked = read_jsonl(str(root / "data_c.jsonl"))
    assert len(ranked) == 12 and sum(len(r["responses"]) == 3 for r in ranked) == 6
    shuffled = read_jsonl(str(root / "data_random_judge.jsonl"))
    assert [r["scores"] for r in shuffled] == [r["scores"] for r in ranked]
    assert [sorted(r["responses"]) for r in shuffled] == [sorted(r["responses"]) for r in ranked]
    assert [r["responses"] for r in read_jsonl(str(root / "data_best_only.jsonl"))] == \
        [r["responses"][:1] for r in ranked]
    summary = json.loads((root / "summary.json").read_text())
    for name in names:
        for split in HELDOUT_SPLITS:
            report = json.loads((root / "eval" / name / split / "report-verifiable.json").read_text())
            assert summary["eval"][name][split] == report["metrics"] and report["metrics"]["prompts"] == 3
            # the figures are those of the answers written next to them
            rows = read_jsonl(str(root / "eval" / name / split / "generations.jsonl"))
            assert report["metrics"]["prompt_strict"] == \
                sum(all(c["strict"] for c in row["constraint_results"]) for row in rows) / 3
    table = (root / "eval" / "comparison.md").read_text()
    assert all(f"{name} {split}" in table for name in names for split in HELDOUT_SPLITS)
    assert "prompt_strict" in table and (root / "eval" / "comparison.png").stat().st_size > 0
    assert "tuna eval verifiable, random_judge: prompt-level strict accuracy heldout" in out


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_verifiable_config_killed_in_a_stage_resumes_and_reports(tmp_path, smollm2_dir):
    """configs/smollm2_verifiable.yaml as it is (its train_c, K = 4, chat template, both controls) at tiny sizes,
    SIGKILLed once Tuna_c is trained (8 instructions: two steps of the config's 4 groups); the same command finishes it without redoing a finished stage."""
    root = tmp_path / "run"
    command = [sys.executable, "-m", "tuna_train.cli", "pipeline", "--config", str(CONFIG), "--output-dir",
               str(root), "--contextual-examples", "8", "--eval-examples", "2", "--max-new-tokens", "8"]
    env = dict(os.environ, TUNA_MODELS_DIR=str(Path(smollm2_dir).parent), PYTHONPATH=str(REPO))
    log = tmp_path / "stderr.log"  # a file, not a pipe nobody reads (a full pipe would block the run)
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    manifest, deadline = root / "manifest.json", time.time() + 600

    def stages():
        try:
            return json.loads(manifest.read_text())["stages"]
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    while stages().get("train_c", {}).get("status") != "done":
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert "summary" not in {p.stem for p in root.glob("*.json")}  # killed before the end
    finished = {name: entry["time"] for name, entry in stages().items() if entry["status"] == "done"}
    assert {"generate", "rank", "train_c"} <= set(finished)
    assert stages()["rank"]["records"] == 8 and stages()["rank"]["pairs"] == 8 * 6

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    after = stages()
    assert all(after[name]["time"] == when for name, when in finished.items())  # nothing finished ran again
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["eval"]) == {"start", "tuna_c", "random_judge", "best_only"}
    assert all(summary["eval"][name][split]["prompts"] == 2 for name in summary["eval"] for split in HELDOUT_SPLITS)
    assert (root / "eval" / "comparison.png").stat().st_size > 0
    assert "tuna_c heldout_unseen" in (root / "eval" / "comparison.md").read_text()
    # the candidates are the start model's own samples in its chat template (not the untrained built-in model)
    generated = read_jsonl(str(root / "generated.jsonl"))
    assert all(len(r["responses"]) == 4 and r["constraints"] for r in generated)
    assert sum(any(c.isalpha() for c in text) for r in generated for text in r["responses"]) >= 24
