"""The shipped paper configs train on all of the data (the paper holds nothing out), and a run with
eval_fraction 0 and no eval_data trains, evaluates nothing and says so in its summary."""

import json
from pathlib import Path

from tuna_train.config import load_config
from tuna_train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_paper_configs_hold_nothing_out():
    for name in ("tuna_p_llama7b_qlora.yaml", "tuna_c_llama7b_qlora.yaml"):
        config = load_config(str(CONFIGS / name))
        assert config.eval_fraction == 0 and config.eval_data is None


def test_eval_fraction_zero_trains_on_everything(tmp_path):
    config = load_config(None, dict(synthetic_examples=40, batch_groups=4, tiny_hidden_size=32, progress=False,
                                    tensorboard=False, eval_fraction=0.0, eval_every=2, log_every=1, max_steps=4,
                                    output_dir=str(tmp_path)))
    trainer = Trainer(config)
    assert len(trainer.data.train) == 40 and trainer.data.eval == []
    summary = trainer.run()
    assert summary["status"] == "finished" and summary["train_groups"] == 40
    assert summary["initial_eval"] is None and summary["final_eval"] is None
    splits = [json.loads(line)["split"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert splits == ["train"] * 4
