"""Truncation by max_length is counted (collate) and reported: progress metrics, metrics.jsonl, summary.json
and a warning above ``truncation_warning``."""

import json
import logging

from tuna_train.config import load_config
from tuna_train.trainer import Trainer

RUN = dict(batch_groups=4, tiny_hidden_size=32, eval_groups=4, progress=False, tensorboard=False, eval_every=0,
           log_every=1, num_epochs=1.0, eval_fraction=0.0, eval_controls=False, max_length=48, save_every=1000)


def records():
    """12 groups: prompts of several lengths (some alone past max_length), responses of several lengths."""
    out = []
    for i in range(12):
        prompt = "P" * (10 + 9 * i)  # byte-level tokens: one per character
        out.append({"prompt": prompt, "responses": ["a" * (3 + 2 * i), "b" * 2, "c" * (20 - i)],
                    "scores": [1.0, 0.5, 0.0]})
    return out


def expected_counts(max_length):
    """Independent of collate: byte lengths (+ EOS); a prompt longer than max_length - 1 is cut, and leaves 1."""
    prompts = responses = groups = 0
    for record in records():
        prompt_len = len(record["prompt"])
        prompt_cut = prompt_len > max_length - 1
        room = 1 if prompt_cut else max_length - prompt_len
        cut = sum(len(r) + 1 > room for r in record["responses"])
        prompts, responses, groups = prompts + prompt_cut, responses + cut, groups + (prompt_cut or cut > 0)
    return prompts, responses, groups


def test_truncation_counted_reported_and_warned(tmp_path, caplog):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    config = load_config(None, dict(RUN, data=str(data), template="none", output_dir=str(tmp_path / "run")))
    with caplog.at_level(logging.WARNING, logger="tuna_train.trainer"):
        summary = Trainer(config).run()
    prompts, responses, groups = expected_counts(48)
    assert 0 < prompts < groups < 12 and responses > prompts
    truncation = summary["truncation"]
    assert (truncation["prompts_truncated"], truncation["responses_truncated"], truncation["groups_truncated"],
            truncation["groups_seen"]) == (prompts, responses, groups, 12)
    assert truncation["truncated_fraction"] == groups / 12
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["split"] == "train" and last["prompts_truncated"] == prompts and last["groups_seen"] == 12
    warnings = [r.getMessage() for r in caplog.records if "max_length 48 cut" in r.getMessage()]
    assert len(warnings) == 1  # once per run


def test_no_warning_when_nothing_is_cut(tmp_path, caplog):
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    config = load_config(None, dict(RUN, data=str(data), template="none", max_length=512,
                                    output_dir=str(tmp_path / "run")))
    with caplog.at_level(logging.WARNING, logger="tuna_train.trainer"):
        summary = Trainer(config).run()
    assert summary["truncation"]["groups_truncated"] == 0 and summary["truncation"]["groups_seen"] == 12
    assert not [r for r in caplog.records if "max_length" in r.getMessage()]
