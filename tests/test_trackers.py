"""Training metrics go to metrics.jsonl and, through accelerate's trackers, to TensorBoard: the same numbers."""

import json

import pytest

from tuna_train.config import load_config
from tuna_train.trainer import Trainer


def test_tensorboard_gets_the_metrics_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(load_config(None, dict(synthetic_examples=120, batch_groups=4, tiny_hidden_size=32, eval_groups=4,
                                   progress=False, eval_every=0, log_every=1, max_steps=3, save_every=100,
                                   output_dir=str(tmp_path)))).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = {row["step"]: row["loss"] for row in rows if row["split"] == "train"}
    runs = [path.parent for path in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")]
    scalars = {}
    for run in runs:
        events = EventAccumulator(str(run))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            scalars.update({event.step: event.value for event in events.Scalars("train/loss")})
    assert scalars.keys() == expected.keys() and len(expected) == 3
    for step, loss in expected.items():
        assert scalars[step] == pytest.approx(loss, rel=1e-6)
    assert (tmp_path / "tensorboard" / "tuna").is_dir()
