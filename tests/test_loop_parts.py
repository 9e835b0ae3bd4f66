"""The parts of the training loop on their own: the group sampler, the learning-rate schedule, the run state."""

import math

import pytest
import torch

from tuna_train.build import build_scheduler
from tuna_train.config import load_config
from tuna_train.run_state import RunState
from tuna_train.sampler import GroupSampler


def test_sampler_covers_each_epoch_once_split_over_processes_and_micro_batches():
    num_groups, batch_groups, grad_accum, world_size = 50, 3, 2, 2
    samplers = [GroupSampler(num_groups, batch_groups, grad_accum, world_size, rank, seed=7) for rank in range(2)]
    assert samplers[0].steps_per_epoch == 50 // 12 == 4
    for epoch in range(2):
        seen = [i for step in range(epoch * 4, epoch * 4 + 4) for micro in range(grad_accum)
                for sampler in samplers for i in sampler.indices(step, micro)]
        assert len(seen) == len(set(seen)) == 48  # no group twice in an epoch; 2 left over
        assert set(seen) <= set(range(num_groups))
    first_epoch = [samplers[0].indices(step, 0) for step in range(4)]
    assert first_epoch != [samplers[0].indices(step, 0) for step in range(4, 8)]  # a new permutation each epoch
    again = GroupSampler(num_groups, batch_groups, grad_accum, world_size, 0, seed=7)
    assert [again.indices(step, 0) for step in range(4)] == first_epoch  # a pure function of seed and step
    assert samplers[0].total_steps(0, 1.5) == 6 and samplers[0].total_steps(5, 1.5) == 5
    with pytest.raises(ValueError, match="fewer than one step"):
        GroupSampler(11, batch_groups, grad_accum, world_size)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_from_zero_then_follows_its_formula(schedule):
    config = load_config(None, dict(learning_rate=0.5, warmup_steps=4, lr_schedule=schedule))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = build_scheduler(config, optimizer, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    decay = {"cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)), "linear": lambda p: 1 - p,
             "constant": lambda p: 1.0}[schedule]
    expected = [0.5 * step / 4 if step < 4 else 0.5 * decay((step - 4) / 16) for step in range(20)]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_run_state_round_trips_and_names_unknown_fields():
    state = RunState(tokens=10, best_eval={"pair_accuracy": 0.5, "step": 3})
    state.count_batch({"tokens": 4, "targets": 2, "tokens_saved": 1, "prompts_truncated": 1,
                       "responses_truncated": 0, "groups_truncated": 1, "groups": 2}, world_size=2)
    assert RunState.from_dict(state.to_dict()) == state
    assert state.tokens == 18 and state.groups_seen == 4 and state.truncation()["truncated_fraction"] == 0.5
    state.track_eval(7, {"pair_accuracy": 0.4})
    assert state.best_eval["step"] == 3
    state.track_eval(8, {"pair_accuracy": 0.6})
    assert state.best_eval == {"pair_accuracy": 0.6, "step": 8}
    with pytest.raises(ValueError, match=r"ckpt/state.json: unknown run-state fields \['epoch'\]"):
        RunState.from_dict(dict(state.to_dict(), epoch=2), source="ckpt/state.json")
