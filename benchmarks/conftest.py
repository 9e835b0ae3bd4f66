"""pytest-benchmark suite: speed and peak memory of the fused Tuna task against the naive baseline and
the peers. ``pytest benchmarks/`` runs quick CPU sizes; ``--bench-size gpu`` runs 7B-like shapes (CUDA).
At the end of the session the results are written to benchmarks/results/ (JSON, Markdown, PNG)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_tasks import Shape  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
ROWS: list = []

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
    parser.addoption("--bench-size", choices=["cpu", "gpu"], default="cpu",
                     help="cpu: quick fp32 sizes (default); gpu: 7B-like bf16 shapes, N = 8192, D = 4096 (CUDA)")
    parser.addoption("--bench-results", default=str(RESULTS_DIR), help="where to write JSON, Markdown and PNG")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = GPU_SHAPES if metafunc.config.getoption("--bench-size") == "gpu" else CPU_SHAPES
        metafunc.parametrize("shape", shapes, ids=[s.label.replace(" ", "-") for s in shapes])


@pytest.fixture(scope="session")
def bench_device(request):
    if request.config.getoption("--bench-size") == "gpu":
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
    from bench_report import write_reports

    size = session.config.getoption("--bench-size")
    paths = write_reports(ROWS, Path(session.config.getoption("--bench-results")), size)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("benchmark results: " + ", ".join(str(p) for p in paths))
