"""pytest-benchmark suite: speed and peak memory of the fused Tuna task against the naive baseline and
the peers. ``pytest benchmarks/`` picks its sizes from the machine (``--bench-size auto``: the 7B-like GPU
shapes when CUDA is available, the quick CPU sizes otherwise). At the end of the session the results (JSON,
Markdown, PNG) are written to a fresh ``benchmarks/results/run-<date>-<time>-<size>/``, so a casual run never
overwrites the committed tables; ``--bench-results benchmarks/results`` refreshes those on purpose. A busy
machine (load average above half the cores) gets a warning, since its timings are noise."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_report import write_reports  # noqa: E402
from bench_tasks import Shape  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
ROWS: list = []
# 1-minute load average per CPU above which timings are called noisy: the timed code uses every core
# (torch's intra-op threads), so on average more than half a core taken by others already skews medians.
LOAD_PER_CPU_LIMIT = 0.5
_LOAD_MESSAGE = pytest.StashKey[Optional[str]]()

CPU_SHAPES = [
    Shape("tuna", 4096, 32000, 256, 4),
    Shape("tuna", 1024, 32000, 256, 4),
    Shape("tuna", 4096, 32000, 128, 8),
    Shape("dpo", 4096, 32000, 256, 2),
]
GPU_SHAPES = [Shape("tuna", 8192, vocab, 4096, 4, seq_len=512) for vocab in (32000, 128256, 256000)] + [
    Shape("tuna", 16384, 128256, 4096, 8, seq_len=512),
    Shape("dpo", 8192, 128256, 4096, 2, seq_len=512),
]


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=["auto", "cpu", "gpu"], default="auto",
                     help="auto (default): gpu when CUDA is available, else cpu; cpu: quick fp32 sizes; "
                          "gpu: 7B-like bf16 shapes, N = 8192, D = 4096 (CUDA)")
    parser.addoption("--bench-results", default=None, metavar="DIR",
                     help="write JSON, Markdown and PNG here (pass benchmarks/results to refresh the committed "
                          "tables); default: a fresh benchmarks/results/run-YYYYmmdd-HHMMSS-<size>/")
    parser.addoption("--bench-allow-load", action="store_true",
                     help="do not warn when the machine is busy (load average above half the cores)")


def bench_size(config) -> str:
    """The --bench-size to act on, with ``auto`` resolved, so no reader has to know about ``auto``."""
    size = config.getoption("--bench-size")
    if size == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return size


def results_dir(config, now: Optional[datetime.datetime] = None) -> Path:
    """Where this session's reports go: --bench-results if given, else a directory no earlier run has used
    (the committed tables are only replaced when asked for)."""
    chosen = config.getoption("--bench-results")
    if chosen:
        return Path(chosen)
    stem = f"run-{(now or datetime.datetime.now()):%Y%m%d-%H%M%S}-{bench_size(config)}"
    path, n = RESULTS_DIR / stem, 1
    while path.exists():  # two sessions in the same second
        n += 1
        path = RESULTS_DIR / f"{stem}-{n}"
    return path


def load_per_cpu() -> Optional[Tuple[float, int]]:
    """(1-minute load average, CPU count), or None where the platform has no load average (Windows)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return load, os.cpu_count() or 1


def load_warning(config) -> Optional[str]:
    """The warning for a busy machine, or None (not busy, unknown, or silenced by --bench-allow-load)."""
    if config.getoption("--bench-allow-load"):
        return None
    figures = load_per_cpu()
    if figures is None or figures[0] / figures[1] <= LOAD_PER_CPU_LIMIT:
        return None
    load, cpus = figures
    return (f"machine is busy: 1-minute load average {load:.2f} on {cpus} CPUs ({load / cpus:.2f} per CPU > "
            f"{LOAD_PER_CPU_LIMIT}); benchmark timings will be noisy (--bench-allow-load silences this)")


def pytest_configure(config):
    """A busy machine is a pytest warning, so it sits in the warnings summary next to the results path
    (and -W error can make it fatal for whoever wants that); the run itself goes on."""
    message = load_warning(config)
    config.stash[_LOAD_MESSAGE] = message
    if message:
        config.issue_config_time_warning(pytest.PytestWarning(message), stacklevel=2)


@pytest.hookimpl(wrapper=True)
def pytest_sessionstart(session):
    """The same warning as a line before the first timing (after pytest's header), where it can still
    change a plan: the summary only comes when a long run is over."""
    yield
    message = session.config.stash.get(_LOAD_MESSAGE, None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if message and reporter is not None:
        reporter.write_line("WARNING: " + message, yellow=True)


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = GPU_SHAPES if bench_size(metafunc.config) == "gpu" else CPU_SHAPES
        metafunc.parametrize("shape", shapes, ids=[s.label.replace(" ", "-") for s in shapes])


@pytest.fixture(scope="session")
def bench_device(request):
    if bench_size(request.config) == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("--bench-size gpu needs a CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="session")
def bench_dtype(bench_device):
    return torch.bfloat16 if bench_device.type == "cuda" else torch.float32


@pytest.fixture(scope="session")
def results():
    return ROWS


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    paths = write_reports(ROWS, results_dir(session.config), bench_size(session.config))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("benchmark results: " + ", ".join(str(p) for p in paths))
