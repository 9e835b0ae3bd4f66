"""The method on a real instruction-tuned model (issue 24): ``tuna pipeline --config
configs/smollm2_verifiable.yaml`` on 3 seeds (``pytest benchmarks/test_verifiable_method.py -s``; progress bars
of every stage on the terminal). SmolLM2-135M-Instruct samples K = 4 responses per training instruction, the
verifiable judge ranks them, Tuna_c (LoRA, the MLE term on the best candidate as the supervised regulariser)
trains on them, and so do the two controls on the same data and budget: the random judge (the candidates
shuffled among the judge's scores) and best-only supervised training (rejection sampling).

Over the seeds it asserts that held-out (in-kind) prompt-level strict accuracy rises from the start model to
Tuna_c on every seed and by more on average than the seed-to-seed spread (max - min) of that rise, and that the
random-judge control does not pass that same test. The criterion is fixed here, before the runs, and not tuned
to them. It writes ``benchmarks/results/verifiable_method.md`` (before asserting, so a failed run is reported
too): the four models on both held-out splits per seed, the measured time of each stage, the judge's ties.

Sizes (SIZES), and how they were decided. The first run (2026-12-03: 48 training instructions, 24 records per
held-out split, 40 new tokens, every usable IFEval kind, 1-3 constraints) took 344-351 s a seed on the idle
machine (105-120 sampled tokens/s with 16 instructions x 4 at once, 4.0-4.6 s per training step of 4 groups, 0.6 s
per greedy eval answer, model loads included) and showed no rise: 32-34 of 48 groups were fully tied, because most
kinds are followed always or never by the 135M model. The config now trains on the kinds its samples follow
sometimes (train_kinds) with 1-2 constraints. The run of 2026-12-04 was on a machine about 1.8x slower (the
embedded default's test: 141 s against 80 s), so SIZES went to 64 / 32 / 40, a third more data than the first run,
for 3 seeds within about 30 minutes; doubling instructions and held-out records had been estimated at 20 minutes a
seed there. Each run's own figures are in the results file ("sizing figures").
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuna_train.model import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_verifiable.yaml"
RESULTS = REPO / "benchmarks" / "results" / "verifiable_method.md"
SEEDS = (42, 1, 2)
MODELS = ("start", "tuna_c", "random_judge", "best_only")
SPLITS = ("heldout", "heldout_unseen")
#: pipeline fields over the config's: the run's size (how it was decided: the module docstring)
SIZES = {"contextual_examples": 64, "eval_examples": 32, "max_new_tokens": 40}


def run_seed(workdir: Path, seed: int) -> dict:
    """One seed's pipeline: its summary, manifest stages and wall time."""
    root = workdir / f"seed{seed}"
    command = [sys.executable, "-m", "tuna_train.cli", "pipeline", "--config", str(CONFIG), "--seed", str(seed),
               "--output-dir", str(root)] + [f"--{key.replace('_', '-')}={value}" for key, value in SIZES.items()]
    env = dict(os.environ, TUNA_PROGRESS=os.environ.get("TUNA_PROGRESS", "1"))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)  # bars: on stderr
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:]
    summary = json.loads((root / "summary.json").read_text())
    return {"seed": seed, "seconds": round(seconds, 1), "eval": summary["eval"], "stages": summary["stages"],
            "rates": rates(root, summary["stages"])}


def rates(root: Path, stages: dict) -> dict:
    """The figures that size a run: sampled tokens per second (K candidates of each instruction together, the
    pipeline's batch_size instructions at once), seconds per training step, seconds per greedy eval answer."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    sampled = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                  for line in (root / "generated.jsonl").read_text().splitlines()
                  for text in json.loads(line)["responses"])
    answers = sum(len((root / "verifiable" / f"{split}.jsonl").read_text().splitlines()) for split in SPLITS)
    evals = [stage for name, stage in stages.items() if name.startswith("eval_")]
    trains = [stage for name, stage in stages.items() if name == "train_c" or name.startswith("control_")]
    return {"generate_tokens_per_s": round(sampled / stages["generate"]["seconds"], 1),
            "train_s_per_step": round(sum(s["seconds"] for s in trains) / sum(s["steps"] for s in trains), 2),
            "eval_s_per_answer": round(sum(s["seconds"] for s in evals) / (answers * len(evals)), 2)}


def rises(runs, model: str, split: str = "heldout"):
    return [run["eval"][model][split]["prompt_strict"] - run["eval"]["start"][split]["prompt_strict"]
            for run in runs]


def passes(values) -> bool:
    """The benchmark's test of a rise: positive on every seed, and its mean above the seed spread."""
    return min(values) > 0 and statistics.mean(values) > max(values) - min(values)


def table(runs) -> str:
    lines = [f"`tuna pipeline --config configs/smollm2_verifiable.yaml` with {SIZES}, seeds {list(SEEDS)}; "
             "prompt-level strict accuracy [95% bootstrap interval] (instruction-level strict after the slash).", "",
             "| seed | model | " + " | ".join(SPLITS) + " |", "|---|---|" + "---|" * len(SPLITS)]
    for run in runs:
        for model in MODELS:
            cells = []
            for split in SPLITS:
                m = run["eval"][model][split]
                low, high = m["prompt_strict_ci95"]
                cells.append(f"{m['prompt_strict']:.3f} [{low:.2f}, {high:.2f}] / {m['instruction_strict']:.3f}")
            lines.append(f"| {run['seed']} | {model} | " + " | ".join(cells) + " |")
    lines += ["", "| rise from start (held-out prompt strict) | per seed | mean | spread | passes |", "|---|---|---|---|---|"]
    for model in MODELS[1:]:
        for split in SPLITS:
            values = rises(runs, model, split)
            lines.append(f"| {model}, {split} | {', '.join(f'{v:+.3f}' for v in values)} | "
                         f"{statistics.mean(values):+.3f} | {max(values) - min(values):.3f} | "
                         f"{'yes' if passes(values) else 'no'} |")
    stage_names = [name for name in runs[0]["stages"] if runs[0]["stages"][name].get("seconds") is not None]
    lines += ["", "Measured seconds per stage (wall time):", "", "| seed | " + " | ".join(stage_names) + " | whole run |",
              "|---|" + "---|" * (len(stage_names) + 1)]
    for run in runs:
        lines.append(f"| {run['seed']} | " + " | ".join(str(run["stages"][n].get("seconds")) for n in stage_names)
                     + f" | {run['seconds']} |")
    lines += ["", "Sizing figures (model loads included):", "", "| seed | sampled tokens/s | s per training step | s per eval answer |",
              "|---|---|---|---|"]
    for run in runs:
        r = run["rates"]
        lines.append(f"| {run['seed']} | {r['generate_tokens_per_s']} | {r['train_s_per_step']} | "
                     f"{r['eval_s_per_answer']} |")
    lines += ["", "| seed | groups | candidate pairs | untied pairs (in the loss) | fully tied groups |",
              "|---|---|---|---|---|"]
    for run in runs:
        rank = run["stages"]["rank"]
        lines.append(f"| {run['seed']} | {rank['records']} | {rank['pairs']} | {rank['untied_pairs']} | "
                     f"{rank['tied_groups']} |")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.real_model
def test_verifiable_method_rises_and_the_random_judge_does_not(tmp_path):
    runs = []
    for seed in SEEDS:
        runs.append(run_seed(tmp_path, seed))
        print(json.dumps({"seed": seed, "seconds": runs[-1]["seconds"],
                          "prompt_strict": {m: runs[-1]["eval"][m]["heldout"]["prompt_strict"] for m in MODELS}}))
    text = table(runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# The method on SmolLM2-135M-Instruct with the verifiable judge\n\n" + text)
    print(text)
    tuna_c, random_judge = rises(runs, "tuna_c"), rises(runs, "random_judge")
    assert passes(tuna_c), f"held-out prompt strict accuracy: start -> Tuna_c rises {tuna_c} (not above the spread)"
    assert not passes(random_judge), f"the random-judge control rises too: {random_judge}"
