"""``reference="model:PATH"``: a separate frozen reference model, loaded like ``tuna score``'s teacher. Its scores
are checked against the other references of the same model (the start model with its adapters off, and a float64
forward of it), it is checked to stay out of the optimizer, the gradients and the checkpoints and to stay
frozen under full fine-tuning, a run with it resumes bit for bit, and bad references are named before any step."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import GROUPS, TARGETS, RecordingLoss, batch, float64_scores, rel_err, tiny, with_adapters
from train_runs import TINY, assert_resumed_exactly, cli_flags, latest_weights, metrics
from tuna_hf import tuna_loss
from tuna_train.config import load_config
from tuna_train.hf_trainer import TunaTrainer, TunaTrainingArguments
from tuna_train.model import add_lora, build_tiny_llama, load_model, load_tokenizer, synthetic_tokenizer
from tuna_train.synthetic import make_records
from tuna_train.trainer import Trainer


@pytest.mark.parametrize("loss_name", ["plackett_luce", "lipo_lambda", "pairwise_logistic"])
def test_a_reference_model_scores_as_the_adapter_reference_of_the_same_start_model(loss_name):
    """tuna_hf: the frozen copy of the start model as reference_model gives the scores of the adapters-off pass
    and of a float64 forward of the start model (1e-6), no gradient, and the same loss and gradients."""
    base = tiny(tied=False)
    start = copy.deepcopy(base)
    model = with_adapters(base, target_modules=TARGETS)
    inputs = batch()
    by_adapter, by_model = (RecordingLoss(loss=loss_name, beta=2.0, impl="chunked") for _ in range(2))
    adapter_loss, _ = tuna_loss(model, *inputs, group_sizes=GROUPS, reference="adapter", loss_fn=by_adapter)
    model_loss, _ = tuna_loss(model, *inputs, group_sizes=GROUPS, reference="model:start", reference_model=start,
                              loss_fn=by_model)
    got, want = by_model.seen_ref_scores, by_adapter.seen_ref_scores
    assert not got.requires_grad
    assert rel_err(got, want) <= 1e-6
    expected = float64_scores(start, *inputs)
    assert rel_err(got[0], expected[:3]) <= 1e-6 and rel_err(got[1, :1], expected[3:]) <= 1e-6
    assert abs(model_loss.item() - adapter_loss.item()) <= 1e-6 * abs(adapter_loss.item())
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    # the reference model's weights still require gradients (tuna_loss leaves the caller's model as it is), yet
    # the loss does not reach them: its reference pass ran under no_grad
    assert all(p.requires_grad for p in start.parameters())
    reaching = torch.autograd.grad(model_loss, adapters + list(start.parameters()), retain_graph=True,
                                   allow_unused=True)
    assert all(g is None for g in reaching[len(adapters):])
    for a, b in zip(reaching[:len(adapters)], torch.autograd.grad(adapter_loss, adapters)):
        assert rel_err(a, b) <= 1e-6
    with pytest.raises(ValueError, match="needs the loaded model as reference_model"):
        tuna_loss(model, *inputs, group_sizes=GROUPS, reference="model:start", loss="plackett_luce")
    with pytest.raises(ValueError, match="goes with reference='model:PATH'"):
        tuna_loss(model, *inputs, group_sizes=GROUPS, reference="adapter", reference_model=start,
                  loss="plackett_luce")


LORA = dict(loss="plackett_luce", lora=True, lora_r=4, lora_dropout=0.0, learning_rate=0.05, max_steps=3)


def test_tuna_train_with_a_reference_model_trains_as_the_adapter_reference(tmp_path, tiny_model_dir):
    """`tuna train --reference model:PATH` with PATH the start model trains as `--reference adapter` (every
    step's losses within 1e-6: both references are the start model); the reference's weights are in neither the
    optimizer nor the checkpoint nor final/, and get no gradient."""
    common = dict(LORA, model=str(tiny_model_dir))
    adapter = Trainer(load_config(None, dict(TINY, reference="adapter", output_dir=str(tmp_path / "adapter"),
                                             **common)))
    adapter.run()
    frozen = Trainer(load_config(None, dict(TINY, reference=f"model:{tiny_model_dir}",
                                            output_dir=str(tmp_path / "model"), **common)))
    reference = frozen.reference_model
    reference_ids = {id(p) for p in reference.parameters()}
    optimised = {id(p) for group in frozen.optimizer.param_groups for p in group["params"]}
    assert reference_ids and not reference_ids & optimised
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    # the module DDP / FSDP wrap holds the policy only (its state_dict, what a sharded checkpoint gathers)
    assert all(name.startswith("causal_lm.") for name in frozen.wrapped.state_dict())
    before = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    frozen.run()
    rows_adapter, rows_model = metrics(tmp_path / "adapter"), metrics(tmp_path / "model")
    assert len(rows_adapter) == len(rows_model) == 3
    for a, m in zip(rows_adapter, rows_model):
        for key in ("loss", "rank_loss", "mle_loss"):
            assert abs(a[key] - m[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a, m)
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(reference.state_dict()[name], tensor) for name, tensor in before.items())
    # the checkpoint and the final adapter hold the policy's trainable weights only: those of the adapter run
    assert latest_weights(tmp_path / "model").keys() == latest_weights(tmp_path / "adapter").keys()
    final = sorted(p.name for p in (tmp_path / "model" / "final").iterdir())
    assert final == sorted(p.name for p in (tmp_path / "adapter" / "final").iterdir())
    assert load_file(str(tmp_path / "model" / "final" / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "adapter" / "final" / "adapter_model.safetensors")).keys()


def test_under_full_fine_tuning_the_reference_model_stays_the_start_model(tmp_path, tiny_model_dir):
    """The trained model and its reference are loaded from the same PATH: the reference is a model of its own,
    so training every weight of the policy leaves it at the start model's weights."""
    trainer = Trainer(load_config(None, dict(TINY, loss="lipo_lambda", reference=f"model:{tiny_model_dir}",
                                             model=str(tiny_model_dir), max_steps=2, learning_rate=0.05,
                                             output_dir=str(tmp_path / "run"))))
    trainer.run()
    start = load_model(str(tiny_model_dir)).state_dict()
    trained = trainer.model.state_dict()
    assert any(not torch.equal(trained[name], start[name]) for name in start)
    assert all(torch.equal(trainer.reference_model.state_dict()[name], start[name]) for name in start)


@pytest.mark.slow
def test_tuna_train_with_a_reference_model_resumes_bit_for_bit(tmp_path, tiny_model_dir):
    assert_resumed_exactly(tmp_path, stop_after=2, total=4, loss="lipo_lambda", reference=f"model:{tiny_model_dir}",
                           model=str(tiny_model_dir), lora=True, lora_r=4, lora_dropout=0.1)


def test_tuna_trainer_with_a_reference_model_trains_as_the_adapter_reference(tmp_path, tiny_model_dir):
    """TunaTrainer loads model:PATH itself (with the tokenizer it is given) and trains as with the adapter
    reference of the same start model; the reference is not one of the trained model's parameters."""
    from datasets import Dataset

    dataset = Dataset.from_list(make_records(12, seed=2))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    losses = {}
    for name in ("adapter", f"model:{tiny_model_dir}"):
        torch.manual_seed(0)  # the same LoRA initialisation in both runs
        model = add_lora(load_model(str(tiny_model_dir)), r=4, alpha=32, dropout=0.0, target_modules="all-linear")
        args = TunaTrainingArguments(output_dir=str(tmp_path / name.replace("/", "_")), loss="plackett_luce",
                                     reference=name, per_device_train_batch_size=4, learning_rate=0.05,
                                     max_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                     disable_tqdm=True, save_strategy="no")
        trainer = TunaTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        if trainer.reference_model is not None:
            ids = {id(p) for p in trainer.reference_model.parameters()}
            assert ids and not ids & {id(p) for p in trainer.model.parameters()}
    adapter, frozen = losses.values()
    assert len(adapter) == len(frozen) == 3
    assert all(abs(a - f) <= 1e-6 * abs(a) for a, f in zip(adapter, frozen)), losses


def test_bad_reference_models_are_named_before_any_step(tmp_path, tiny_model_dir):
    other = tmp_path / "other_tokenizer"  # the same tiny Llama with a tokenizer of 10 more tokens
    build_tiny_llama(hidden_size=64, seed=5, vocab_size=394).save_pretrained(str(other))
    type(synthetic_tokenizer())(extra_ids=10).save_pretrained(str(other))
    common = dict(TINY, loss="plackett_luce", model=str(tiny_model_dir), output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=f"reference model:{other}: its tokenizer differs"):
        Trainer(load_config(None, dict(common, reference=f"model:{other}")))
    with pytest.raises(ValueError, match="'reference_load_in_4bit' places a reference model"):
        load_config(None, dict(common, reference="adapter", lora=True, reference_load_in_4bit=True))
    with pytest.raises(ValueError, match="needs a loss that reads reference scores"):
        load_config(None, dict(common, reference=f"model:{tiny_model_dir}", loss="tuna_margin"))
    missing = tmp_path / "missing"
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "train",
                           *cli_flags(loss="plackett_luce", reference=f"model:{missing}",
                                      output_dir=str(tmp_path / "cli"))], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (f"tuna train: error: reference model:{missing}: no such model "
                                                   "directory (a local model or LoRA adapter directory, or a "
                                                   "prepared real model's name)")
    with pytest.raises(ValueError, match="field 'reference' 'model:x' needs a loss"):
        TunaTrainingArguments(output_dir=str(tmp_path / "hf"), reference="model:x", report_to=[])


def test_a_4bit_reference_model_is_placed_as_the_teacher_and_trains(tmp_path, tiny_model_dir):
    """reference_load_in_4bit / reference_dtype place the reference as `tuna score --load-in-4bit --dtype` places a
    teacher: NF4 weights computing in that dtype; the trained model stays float32 and the run trains."""
    bnb = pytest.importorskip("bitsandbytes")
    trainer = Trainer(load_config(None, dict(TINY, loss="plackett_luce", reference=f"model:{tiny_model_dir}",
                                             reference_load_in_4bit=True, reference_dtype="float32",
                                             model=str(tiny_model_dir), lora=True, lora_r=4, max_steps=1,
                                             output_dir=str(tmp_path / "run"))))
    quantised = [m for m in trainer.reference_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(m.compute_dtype == torch.float32 for m in quantised)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    summary = trainer.run()
    assert summary["status"] == "finished" and math.isfinite(metrics(tmp_path / "run")[0]["loss"])
