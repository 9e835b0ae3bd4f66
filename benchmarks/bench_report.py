"""Write the benchmark results: JSON (everything), Markdown (tables a person can read), PNG (a plot).

Every row carries its ratio to the naive baseline of the same shape. The Markdown also summarises the
static GPU report (ahead-of-time compilation, no GPU needed) of our kernels and of the peers' kernels.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List

MB = 1024 * 1024


def machine_info(size: str) -> Dict[str, str]:
    import torch

    versions = {}
    for package in ("torch", "triton", "tuna", "cut-cross-entropy", "liger-kernel"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
            "python": platform.python_version(), "torch_threads": str(torch.get_num_threads()),
            "bench_size": size, "versions": ", ".join(f"{k} {v}" for k, v in versions.items())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def static_reports() -> Dict[str, List[dict]]:
    """Our kernels (python -m tuna_kernels.devtools.report --json) and the peers' (bench_peer_kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ours: List[dict]
    done = subprocess.run([sys.executable, "-m", "tuna_kernels.devtools.report", "--json", "--dtype", "bf16", "--defaults-only"],
                          env=env, capture_output=True, text=True)
    try:
        ours = json.loads(done.stdout)
    except json.JSONDecodeError:
        ours = [{"kernel": "tuna_kernels", "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}]
    from bench_peer_kernels import peer_rows

    return {"tuna": ours, "peers": peer_rows()}


def _ratio(value, base):
    return value / base if value is not None and base else None


def with_ratios(rows: List[dict]) -> List[dict]:
    naive = {r["shape"]: r for r in rows if r["impl"] == "naive" and r["status"] == "ok"}
    out = []
    for row in rows:
        base = naive.get(row["shape"], {})
        out.append(dict(row, time_vs_naive=_ratio(row.get("time_median_s"), base.get("time_median_s")),
                        peak_vs_naive=_ratio(row.get("peak_bytes"), base.get("peak_bytes"))))
    return out


def _fmt(value, spec, suffix=""):
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows: List[dict], info: Dict[str, str], static: Dict[str, List[dict]]) -> str:
    device = "GPU" if "gpu" in info else "CPU"
    dtype = rows[0]["dtype"].replace("torch.", "") if rows else "?"
    lines = [f"# Benchmark: fused Tuna task, forward + backward ({device}, {dtype})", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "Task: per-sequence log-likelihoods of K candidates per group from `hidden [N, D]` and "
              "`weight [V, D]`, then the Tuna loss (margin ranking + MLE); `dpo`: K = 2, summed log-probs, "
              "-log sigmoid(0.1 (s_chosen - s_rejected)), the part Liger-Kernel's fused preference loss "
              "expresses. Time: median of the timed rounds. Peak: bytes allocated above the inputs during "
              "forward + backward (" + ("torch.cuda.max_memory_allocated" if device == "GPU" else
                                          "allocator events recorded by the PyTorch profiler") + "). "
              "Every implementation's loss and gradients were checked against the naive path before timing.",
              f"These numbers were measured on this {device}; "
              + ("GPU numbers need a run with `--bench-size gpu` on a GPU." if device == "CPU" else
                 "CPU numbers come from the default run."), ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += [f"## {shape}", "", "| implementation | time (ms) | time / naive | peak extra (MB) | peak / naive "
                  "| largest tensor (MB) | max rel. error | note |", "|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["shape"] == shape):
            if row["status"] != "ok":
                lines.append(f"| {row['impl']} | – | – | – | – | – | – | {row['status']}: {row.get('reason', '')} |")
                continue
            error = max(row["rel_err_loss"], row["rel_err_grad_hidden"], row["rel_err_grad_weight"])
            lines.append(
                f"| {row['impl']} | {row['time_median_s'] * 1e3:.0f} | {_fmt(row['time_vs_naive'], '.2f', 'x')} "
                f"| {row['peak_bytes'] / MB:.1f} | {_fmt(row['peak_vs_naive'], '.3f', 'x')} "
                f"| {row['largest_bytes'] / MB:.1f} | {error:.1e} | |")
        lines.append("")
    lines += ["## Static GPU report (ahead-of-time compilation, no GPU)", "",
              "Registers per thread, spill bytes (stack + local), shared memory per block (KB, against the "
              "card's limit) and tensor-core instructions, per kernel and architecture, bf16. Peers are "
              "compiled with this machine's triton, in the configuration they launch with by default.", "",
              "| source | kernel | config | arch | regs | spill B | shared KB / limit | MMA |", "|---|---|---|---|---|---|---|---|"]
    for source, source_rows in (("tuna", static["tuna"]), ("peer", static["peers"])):
        for row in source_rows:
            if "error" in row:
                lines.append(f"| {source} | {row.get('kernel')} | {row.get('config', '')} | {row.get('arch', '')} "
                             f"| – | – | – | {row['error']} |")
                continue
            lines.append(f"| {source} | {row['kernel']} | {row['config']} | {row['arch']} | {row['registers']} "
                         f"| {row['spill_bytes']} | {row['shared_bytes'] / 1024:.0f} / {row['shared_limit'] / 1024:.0f} "
                         f"| {'yes' if row['mma'] else 'no'} ({row['mma_instructions']}) |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["status"] == "ok"))
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    width = 0.8 / max(1, len(impls))
    for axis, key, label in ((axes[0], "time_vs_naive", "time / naive"), (axes[1], "peak_vs_naive", "peak memory / naive")):
        for i, impl in enumerate(impls):
            values = [next((r[key] for r in rows if r["shape"] == s and r["impl"] == impl and r["status"] == "ok"), 0)
                      or 0 for s in shapes]
            axis.bar([x + i * width for x in range(len(shapes))], values, width, label=impl)
        axis.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(shapes))])
        axis.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=7)
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_ylabel(label)
        if key == "peak_vs_naive":
            axis.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(impls), fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(rows: List[dict], directory: Path, size: str) -> List[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rows = with_ratios(rows)
    info = machine_info(size)
    static = static_reports()
    stem = f"benchmark_{size}"
    json_path, md_path, png_path = (directory / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps({"machine": info, "rows": rows, "static_report": static}, indent=1))
    md_path.write_text(markdown(rows, info, static))
    plot(rows, png_path, f"tuna benchmark ({info['machine']}; {rows[0]['dtype'] if rows else ''})")
    return [json_path, md_path, png_path]
