"""27.9: Ctrl-C in a training stage of `tuna pipeline`: the stage saves a checkpoint, the pipeline stops with one
line saying how to resume (it used to go on and load the stage's final/ that did not exist), and the same
command resumes the stage from its checkpoint; Ctrl-C in generation is one line too, and the next run goes on
from the records generated."""

import json

import pytest

from tuna_train import cli
from tuna_train.pipeline import workflow
from tuna_train.pipeline.store import JsonlStore
from tuna_train.trainer import Trainer
from train_runs import ctrl_c_in_stage

TINY_STAGE = ("{max_steps: %d, batch_groups: 2, tiny_hidden_size: 32, progress: false, eval_controls: false, "
              "eval_every: 0}")


def pipeline_flags(root):
    return ["pipeline", "--output-dir", str(root), "--sft-examples", "24", "--synthetic-examples", "40",
            "--contextual-examples", "4", "--eval-examples", "8", "--num-candidates", "2", "--max-new-tokens", "4",
            "--max-tries", "1", "--sft", TINY_STAGE % 2, "--train-p", TINY_STAGE % 4, "--train-c", TINY_STAGE % 2]



def test_ctrl_c_in_a_stages_last_step_stops_the_pipeline_after_that_stage(tmp_path, monkeypatch, capsys):
    """The stop is not lost when it comes during a stage's last step: the stage finishes (its final model is
    written), the pipeline stops before the next stage, and the same command goes on from there."""
    root = tmp_path / "run"
    monkeypatch.setattr(workflow, "Trainer", ctrl_c_in_stage("train_p", at_step=4))
    assert cli.main(pipeline_flags(root)) == 3
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tuna pipeline:")]
    assert len(message) == 1 and "stage train_p finished its last step (4) and stopped there" in message[0]
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert stages["train_p"]["status"] == "done" and (root / "train_p" / "final").exists()
    assert "generate" not in stages
    monkeypatch.setattr(workflow, "Trainer", Trainer)
    assert cli.main(pipeline_flags(root)) == 0
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert all(stages[name]["status"] == "done" for name in ("generate", "rank", "train_c"))


def test_ctrl_c_in_a_training_stage_stops_the_pipeline_and_resumes_it(tmp_path, monkeypatch, capsys):
    root = tmp_path / "run"
    monkeypatch.setattr(workflow, "Trainer", ctrl_c_in_stage("train_p"))
    assert cli.main(pipeline_flags(root)) == 3
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("tuna pipeline:")]
    assert len(message) == 1 and "Traceback" not in err and "Repo id" not in err, err[-2000:]
    assert "stage train_p stopped at step 1 of 4" in message[0] and "resume" in message[0]
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert stages["sft"]["status"] == "done" and stages["train_p"]["status"] == "partial"
    assert "generate" not in stages and not (root / "train_p" / "final").exists()

    # the same command again: train_p resumes and finishes; then Ctrl-C after generate's second record
    monkeypatch.setattr(workflow, "Trainer", Trainer)
    put, stored = JsonlStore.put, []

    def interrupted_put(self, key, entry):
        if self.path.name == "generated.jsonl.progress.jsonl" and len(stored) == 2:
            raise KeyboardInterrupt
        put(self, key, entry)
        stored.append(key)

    monkeypatch.setattr(JsonlStore, "put", interrupted_put)
    try:
        code = cli.main(pipeline_flags(root))
    except KeyboardInterrupt:  # (pytest would stop the session on it)
        pytest.fail("Ctrl-C in generation escaped tuna pipeline as a KeyboardInterrupt traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("tuna pipeline:")] == \
        [f"tuna pipeline: interrupted; {workflow.resume_hint(str(root))}"]
    summary_p = json.loads((root / "train_p" / "summary.json").read_text())
    assert summary_p["resumed_from_step"] == 1 and summary_p["steps"] == 4 and summary_p["steps_this_run"] == 3

    monkeypatch.setattr(JsonlStore, "put", put)  # and again: generation goes on from its progress file
    assert cli.main(pipeline_flags(root)) == 0
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert all(stages[name]["status"] == "done" for name in ("sft", "train_p", "generate", "rank", "train_c"))
    assert stages["generate"]["records"] == 4 and stages["generate"]["generated"] == 2
