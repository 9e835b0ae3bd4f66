"""The reference model of the listwise preference losses (plackett_luce, lipo_lambda, pairwise_logistic as DPO):
``reference="adapter"``, the same model with its LoRA adapters off, computed in the same step without gradients.
Checked against the base model's own float64 scores (a copy taken before the adapters were added), the loss
against the naive float64 formulas of those scores, the adapters' state after the pass, refusals, and a
`tuna train --reference adapter` run that resumes bit for bit."""

import copy

import pytest
import torch

import naive_tuna as naive
from helpers import GROUPS, TARGETS, RecordingLoss, batch, float64_scores, own_logits, rel_err, tiny, with_adapters
from train_runs import TINY, assert_resumed_exactly
from tuna_hf import adapters_disabled, tuna_loss
from tuna_kernels import TunaLoss
from tuna_train.config import load_config


def as_matrix(scores):
    """[4] row scores -> [G, K] lists in GROUPS' layout (row 3's missing candidates as 0, invalid)."""
    return [scores[:3].tolist(), [float(scores[3]), 0.0, 0.0]]


@pytest.mark.parametrize("loss_name", ["plackett_luce", "lipo_lambda", "pairwise_logistic"])
def test_the_adapter_reference_is_the_base_model_and_carries_no_gradient(loss_name):
    base = tiny(tied=False)
    frozen_copy = copy.deepcopy(base)
    model = with_adapters(base, target_modules=TARGETS)
    inputs = batch()
    loss_fn = RecordingLoss(loss=loss_name, beta=2.0, impl="chunked")
    loss, _ = tuna_loss(model, *inputs, group_sizes=GROUPS, reference="adapter", loss_fn=loss_fn)
    ref = loss_fn.seen_ref_scores
    expected_ref = float64_scores(frozen_copy, *inputs)
    assert not ref.requires_grad
    assert rel_err(ref[0], expected_ref[:3]) <= 1e-6 and rel_err(ref[1, :1], expected_ref[3:]) <= 1e-6
    # the adapters are back on, and trainable: the policy differs from the base, and its loss is the formula's
    policy = float64_scores(model, *inputs)
    assert rel_err(policy, expected_ref) > 1e-3
    valid = [[True] * 3, [True, False, False]]
    naive_loss = {"plackett_luce": lambda s, r: naive.plackett_luce(s, valid, 2.0, r),
                  "lipo_lambda": lambda s, r: naive.lipo_lambda(s, valid, 2.0, r),
                  "pairwise_logistic": lambda s, r: naive.pairwise_logistic(s, valid, 2.0, r)}[loss_name]
    mle = -sum(torch.log_softmax(l, -1)[t].item() for l, t in zip(*own_logits(model, *inputs)[:2])) / \
        int((inputs[2][:, 1:] != -100).sum())
    want = naive_loss(as_matrix(policy), as_matrix(expected_ref)) + mle
    assert abs(float(loss) - want) <= 1e-5 * abs(want)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.requires_grad for p in adapters)
    # gradients: those of the same loss with the reference scores given as constants
    grads = torch.autograd.grad(loss, adapters)
    again, _ = tuna_loss(model, *inputs, group_sizes=GROUPS, ref_scores=ref.clone(),
                         loss_fn=TunaLoss(loss=loss_name, beta=2.0, impl="chunked"))
    for got, want_grad in zip(grads, torch.autograd.grad(again, adapters)):
        assert rel_err(got, want_grad) <= 1e-6


def test_adapters_disabled_restores_each_layers_state_and_refuses_a_model_without_adapters():
    model = with_adapters(tiny(tied=True), target_modules=TARGETS)
    lora = [m for m in model.modules() if hasattr(m, "lora_A") and m.lora_A]
    lora[0].enable_adapters(False)  # a layer the user switched off stays off
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters_disabled(model):
        assert all(layer.disable_adapters for layer in lora)
    assert lora[0].disable_adapters and not any(layer.disable_adapters for layer in lora[1:])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    with pytest.raises(ValueError, match="needs a model with peft adapters"):
        tuna_loss(tiny(tied=False), *batch(), group_sizes=GROUPS, reference="adapter", loss="plackett_luce")
    with pytest.raises(ValueError, match="reference must be one of"):
        tuna_loss(model, *batch(), group_sizes=GROUPS, reference="model", loss="plackett_luce")
    with pytest.raises(ValueError, match="pass them as ref_scores"):
        tuna_loss(model, *batch(), group_sizes=GROUPS, reference="field", loss="plackett_luce")


@pytest.mark.parametrize("overrides, pattern", [
    (dict(reference="adapter", loss="plackett_luce"), "needs 'lora'"),
    (dict(reference="adapter", loss="tuna_margin", lora=True), "a loss that reads reference scores"),
    (dict(reference="frozen"), "reference"),
])
def test_train_refuses_a_reference_it_cannot_use(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, dict(output_dir=str(tmp_path / "run"), **overrides))


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["plackett_luce", "lipo_lambda"])
def test_tuna_train_with_the_adapter_reference_resumes_bit_for_bit(tmp_path, loss_name):
    assert_resumed_exactly(tmp_path, stop_after=2, total=4, loss=loss_name, reference="adapter", lora=True,
                           lora_r=4, lora_dropout=0.1)


def test_the_trainer_hands_the_adapter_reference_to_the_loss(tmp_path, monkeypatch):
    """Through `tuna train`'s fused module: every loss call gets reference scores without gradient; on the first
    step LoRA's B is zero, so the reference (adapters off) equals the policy: its mean score per rank is the
    policy's ``score_per_rank`` metric."""
    from tuna_train.trainer import Trainer

    calls = []
    original = TunaLoss.forward

    def recording(self, hidden, weight, labels, layout, **kwargs):
        loss, metrics = original(self, hidden, weight, labels, layout, **kwargs)
        calls.append((kwargs.get("ref_scores"), layout.valid(), metrics["score_per_rank"]))
        return loss, metrics

    monkeypatch.setattr(TunaLoss, "forward", recording)
    overrides = dict(loss="plackett_luce", reference="adapter", lora=True, lora_r=4, max_steps=1)
    Trainer(load_config(None, dict(TINY, output_dir=str(tmp_path / "run"), **overrides))).run()
    assert calls
    ref, valid, policy_per_rank = calls[0]
    assert ref is not None and not ref.requires_grad
    ref_per_rank = torch.where(valid, ref, torch.zeros_like(ref)).sum(0) / valid.sum(0).clamp(min=1)
    assert rel_err(ref_per_rank, policy_per_rank) <= 1e-6


def test_record_reference_scores_follow_their_responses_and_are_checked():
    from tuna_train.data import DataError, parse_record

    record = {"instruction": "i", "responses": ["b", "a", "c"], "scores": [1.0, 2.0, 0.0], "ref_scores": [-1, -2, -3]}
    example = parse_record(record, "native", "f.jsonl:1")
    assert example.responses == ["a", "b", "c"] and example.ref_scores == [-2.0, -1.0, -3.0]
    ranked = parse_record({"instruction": "i", "responses": ["b", "a", "c"], "ranking": [1, 0],
                           "ref_scores": [-1, -2, -3]}, "native", "f.jsonl:2")
    assert ranked.responses == ["a", "b"] and ranked.ref_scores == [-2.0, -1.0]
    for bad, pattern in (([-1, -2], "'ref_scores' has 2 entries for 3 responses"),
                         ([-1, float("nan"), 0], r"'ref_scores\[1\]' must be a finite number")):
        with pytest.raises(DataError, match=pattern):
            parse_record(dict(record, ref_scores=bad), "native", "f.jsonl:3")


def test_precomputed_reference_scores_train_as_the_adapter_reference(tmp_path):
    """Records whose ref_scores are the start model's own scores (written here through the adapters-off pass of
    the model the trainer built) train exactly as the on-the-fly adapter reference: the same losses each step;
    training records without ref_scores are refused naming one, before any step."""
    import json

    from tuna_hf import fused_batch_forward
    from tuna_train.data import DataError, examples_from_records
    from tuna_train.synthetic import make_records
    from tuna_train.trainer import Trainer

    records = make_records(24)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = dict(TINY, data=str(data), loss="plackett_luce", lora=True, lora_r=4, max_steps=3, learning_rate=0.05,
                  lora_dropout=0.0)
    on_the_fly = Trainer(load_config(None, dict(common, reference="adapter", output_dir=str(tmp_path / "adapter"))))
    with torch.no_grad(), adapters_disabled(on_the_fly.model):
        for record in records:
            batch = on_the_fly.make_batch(examples_from_records([record]))
            sums, counts = fused_batch_forward(on_the_fly.model, batch, scores_only=True, impl="chunked")
            best_first = (sums / counts).tolist()  # alpha = 1: mean token log-prob, best first
            order = sorted(range(len(best_first)), key=lambda i: -record["scores"][i])  # the loader's (stable) order
            record["ref_scores"] = [best_first[order.index(i)] for i in range(len(best_first))]  # the file's order
    with_refs = tmp_path / "with_refs.jsonl"
    with_refs.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {}
    for name, trainer in (("adapter", on_the_fly), ("field", Trainer(load_config(None, dict(
            common, data=str(with_refs), reference="field", output_dir=str(tmp_path / "field")))))):
        trainer.run()
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["split"] == "train"]
    assert len(rows["adapter"]) == len(rows["field"]) == 3
    for a, f in zip(rows["adapter"], rows["field"]):
        assert abs(a["loss"] - f["loss"]) <= 1e-5 * abs(a["loss"]) and abs(a["rank_loss"] - f["rank_loss"]) <= 1e-5
    for record in records[1:]:
        record.pop("ref_scores")
    with_refs.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=r"with_refs.jsonl.*'ref_scores' is missing"):
        Trainer(load_config(None, dict(common, data=str(with_refs), reference="field",
                                       output_dir=str(tmp_path / "missing"))))


def test_tuna_training_arguments_take_a_loss_registered_after_import(tmp_path):
    """The loss choices are the registry's at parsing and validation time, not a copy made at import: a loss
    registered afterwards parses (HfArgumentParser, as a training script reads flags) and validates, and once it
    is gone it is refused by name."""
    from transformers import HfArgumentParser

    from tuna_kernels import LOSSES, REFERENCE_LOSSES, register_loss
    from tuna_kernels.losses import plackett_luce_loss
    from tuna_train.hf_trainer import TunaTrainingArguments

    def doubled_plackett_luce(scores, valid, options, **references):
        return 2 * plackett_luce_loss(scores, valid, options, **references)

    name = "test_doubled_plackett_luce"
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    try:
        register_loss(name, uses_reference=True)(doubled_plackett_luce)
        (parsed,) = HfArgumentParser(TunaTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--loss", name, "--reference", "adapter", "--report_to", "none"])
        assert parsed.loss == name and parsed.reference == "adapter"
        assert TunaTrainingArguments(loss=name, reference=f"model:{tmp_path}", **common).loss == name
    finally:
        LOSSES.pop(name, None)
        REFERENCE_LOSSES.discard(name)
    with pytest.raises(ValueError, match=f"field 'loss' must be one of .*got '{name}'"):
        TunaTrainingArguments(loss=name, **common)
    with pytest.raises(ValueError, match="field 'reference' must be one of"):
        TunaTrainingArguments(loss="plackett_luce", reference="frozen", **common)
