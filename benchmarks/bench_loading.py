"""Memory and time of loading a large ranked-data file with ``tuna_train.data.load_ranked``.

Writes a JSON lines file of native records (400k records, about 80 MB by default), then loads it in a fresh
subprocess (so imports and earlier allocations do not blur the figure) and reports the growth of the resident
set (psutil RSS after the load minus before it, with the loaded examples still alive), the peak growth (the
largest RSS sampled every 5 ms during the load, minus the RSS before), the time, and the file size; then the
growth after one pass over every example (which maps every page of a memory-mapped store; file-backed pages
the kernel may drop again, reported apart as the anonymous growth). A load of a 2-record file first sets up
the libraries; its growth is reported, not counted. Acceptance (issue 13): the growth is at most the file's
size.

    python benchmarks/bench_loading.py [--records 400000] [--keep FILE] [--json OUT]

``benchmarks/test_loading.py`` runs it under pytest (``pytest benchmarks/test_loading.py``); it is not
part of ``tests/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def write_native_jsonl(path: Path, num_records: int, seed: int = 0) -> int:
    """``num_records`` native records (an instruction, an input, 4 responses, 4 scores; ~200 bytes each) ->
    the file's size in bytes."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(num_records):
            record = {"instruction": text(6), "input": text(3), "responses": [text(3) for _ in range(4)],
                      "scores": [round(rng.random(), 4) for _ in range(4)]}
            handle.write(json.dumps(record) + "\n")
    return path.stat().st_size


# Runs in the child: imports and a load of a 2-record file first (one-time library set-up, not counted), then
# the load, measured with the examples alive.
CHILD = r"""
import gc, json, sys, threading, time
import psutil
from tuna_train import data
process = psutil.Process()
gc.collect()
cold = process.memory_info().rss
warm_up, _ = data.load_ranked(sys.argv[2])
del warm_up
gc.collect()
before_info = process.memory_info()
before = before_info.rss
peak, done = before, threading.Event()

def sample():  # the peak of this load alone (ru_maxrss would also hold earlier peaks, even the parent's)
    global peak
    while not done.wait(0.005):
        peak = max(peak, process.memory_info().rss)

sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
examples, report = data.load_ranked(sys.argv[1])
seconds = time.perf_counter() - start
done.set()
sampler.join()
gc.collect()
after = process.memory_info().rss
peak = max(peak, after)
first, last = examples[0], examples[len(examples) - 1]  # still usable after the measurement
start = time.perf_counter()
count = sum(1 for _ in examples)  # a pass over every example maps every page of the store
pass_seconds = time.perf_counter() - start
touched_info = process.memory_info()
touched = touched_info.rss
print(json.dumps({"records": len(examples), "seconds": seconds, "rss_growth": after - before,
                  "rss_growth_after_a_pass": touched - before, "pass_seconds": pass_seconds,
                  # file-backed pages (the memory-mapped store) are counted in 'shared'; the rest is anonymous
                  "anonymous_growth_after_a_pass": (touched - touched_info.shared) - (before - before_info.shared),
                  "warm_up_growth": before - cold,
                  "peak_growth": peak - before, "loader": data.__file__,
                  "checksum": [first.responses[0], last.scores[0]]}))
"""


def measure(path: Path) -> dict:
    """Load ``path`` in a fresh interpreter -> the child's figures (see CHILD)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="tuna-bench-warm-up-") as tmp:
        warm_up = Path(tmp) / "warm_up.jsonl"
        write_native_jsonl(warm_up, 2)
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm_up)], env=env, capture_output=True,
                             text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(num_records: int = 400_000, keep: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tuna-bench-loading-") as tmp:
        path = Path(keep) if keep else Path(tmp) / "ranked.jsonl"
        if not path.exists():
            write_native_jsonl(path, num_records)
        result = measure(path)
        result["file_bytes"] = path.stat().st_size
    result["growth_over_file"] = result["rss_growth"] / result["file_bytes"]
    result["peak_over_file"] = result["peak_growth"] / result["file_bytes"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--keep", help="write the data file here (reused if it exists) instead of a temp dir")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    result = run(args.records, args.keep)
    mb = 1 << 20
    print(f"{result['records']} records, file {result['file_bytes'] / mb:.1f} MB: load {result['seconds']:.1f} s, "
          f"RSS +{result['rss_growth'] / mb:.0f} MB ({result['growth_over_file']:.2f}x the file), "
          f"peak +{result['peak_growth'] / mb:.0f} MB ({result['peak_over_file']:.2f}x); one-time set-up before it "
          f"+{result['warm_up_growth'] / mb:.0f} MB; after a pass over every example ({result['pass_seconds']:.1f} s) "
          f"+{result['rss_growth_after_a_pass'] / mb:.0f} MB, of it anonymous "
          f"+{result['anonymous_growth_after_a_pass'] / mb:.0f} MB [{result['loader']}]")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
