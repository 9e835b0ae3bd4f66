"""The benchmark suite's options (issue 16), checked on benchmarks/conftest.py's helpers without running a
benchmark: ``--bench-size auto`` follows CUDA, results go to a fresh run directory unless
``--bench-results`` says otherwise, and a busy machine gets a warning."""

import datetime
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

CONFTEST = Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"
NOW = datetime.datetime(2025, 1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def bench():
    """benchmarks/conftest.py as a plain module (under its own name: it is not this directory's conftest)."""
    saved_path = list(sys.path)  # it puts benchmarks/ first, which would shadow this directory's conftest
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
    return module


class Recorder:
    """Collects what a pytest object is asked to do: options declared, lines written, warnings issued."""

    def __init__(self):
        self.options, self.lines, self.warnings = {}, [], []

    def addoption(self, name, **kwargs):
        self.options[name] = kwargs.get("default", False if kwargs.get("action") == "store_true" else None)

    def write_line(self, line, **markup):
        self.lines.append(line)

    def get_plugin(self, name):
        return self if name == "terminalreporter" else None


def start_session(bench, config):
    """Runs the suite's pytest_sessionstart, a hook wrapper: its line comes after pytest's own start."""
    wrapper = bench.pytest_sessionstart(SimpleNamespace(config=config))
    next(wrapper)
    with pytest.raises(StopIteration):
        next(wrapper)


class FakeConfig:
    """A pytest config with the suite's real defaults (from its pytest_addoption) and the given overrides."""

    def __init__(self, bench, **overrides):
        declared = Recorder()
        bench.pytest_addoption(declared)
        self.values = dict(declared.options, **{"--" + k.replace("_", "-"): v for k, v in overrides.items()})
        self.stash, self.pluginmanager = {}, Recorder()

    def getoption(self, name):
        return self.values[name]

    def issue_config_time_warning(self, warning, stacklevel):
        self.pluginmanager.warnings.append(warning)


def test_auto_is_the_default_and_follows_cuda(bench, monkeypatch):
    config = FakeConfig(bench)
    assert config.getoption("--bench-size") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.bench_size(config) == "gpu"
    assert bench.bench_size(FakeConfig(bench, bench_size="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.bench_size(config) == "cpu"
    assert bench.bench_size(FakeConfig(bench, bench_size="gpu")) == "gpu"  # then bench_device skips


def test_the_shapes_follow_the_resolved_size(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = []
    metafunc = SimpleNamespace(fixturenames=["shape"], config=FakeConfig(bench),
                               parametrize=lambda name, shapes, ids: chosen.append(shapes))
    bench.pytest_generate_tests(metafunc)
    assert chosen == [bench.GPU_SHAPES]


def test_results_go_to_a_fresh_run_directory_by_default(bench, monkeypatch, tmp_path):
    assert bench.RESULTS_DIR == CONFTEST.parent / "results"
    assert bench.results_dir(FakeConfig(bench, bench_size="cpu"), NOW) == bench.RESULTS_DIR / "run-20250102-030405-cpu"
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    (tmp_path / "run-20250102-030405-gpu").mkdir()  # an earlier session in the same second
    assert bench.results_dir(FakeConfig(bench, bench_size="gpu"), NOW) == tmp_path / "run-20250102-030405-gpu-2"


def test_bench_results_is_honoured(bench, tmp_path):
    assert bench.results_dir(FakeConfig(bench, bench_results=str(tmp_path)), NOW) == tmp_path


def test_the_session_writes_to_the_run_directory_and_prints_it(bench, monkeypatch):
    """pytest_sessionfinish with write_reports stubbed: the committed benchmarks/results/ files are not the target."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    written = []
    monkeypatch.setattr(bench, "write_reports", lambda rows, directory, size: written.append((directory, size))
                        or [directory / f"benchmark_{size}.json"])
    monkeypatch.setattr(bench, "ROWS", [{"impl": "naive"}])
    config = FakeConfig(bench)
    bench.pytest_sessionfinish(SimpleNamespace(config=config), 0)
    [(directory, size)] = written
    assert size == "cpu"
    assert directory.parent == bench.RESULTS_DIR
    assert directory.name.startswith("run-") and directory.name.endswith("-cpu")
    assert not directory.exists()
    assert config.pluginmanager.lines == [f"benchmark results: {directory / 'benchmark_cpu.json'}"]


def test_a_busy_machine_is_warned_about(bench, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.2, 0.1))
    config = FakeConfig(bench)
    bench.pytest_configure(config)
    start_session(bench, config)
    [warning] = config.pluginmanager.warnings
    assert isinstance(warning, pytest.PytestWarning)
    assert "load average 1.50 on 2 CPUs" in str(warning) and "noisy" in str(warning)
    assert config.pluginmanager.lines == ["WARNING: " + str(warning)]
    assert bench.load_warning(FakeConfig(bench, bench_allow_load=True)) is None


def test_an_idle_or_unknown_machine_is_not_warned_about(bench, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.9, 3.0, 3.0))  # only the last minute counts
    assert bench.load_warning(FakeConfig(bench)) is None

    def no_load_average():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load_average)
    config = FakeConfig(bench)
    bench.pytest_configure(config)
    start_session(bench, config)
    assert config.pluginmanager.warnings == [] and config.pluginmanager.lines == []
