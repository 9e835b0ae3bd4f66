"""The static GPU report: every configuration a kernel can launch with (its default and its autotuning
candidates) compiles for sm_80/86/89/90 with no spills, within shared memory, and with tensor-core
instructions. Needs no GPU (ahead-of-time compilation)."""

import json
import os
import subprocess
import sys

import pytest

from tuna_kernels.kernels.configs import KERNELS, candidate_configs, default_config


@pytest.fixture(scope="module")
def report_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tuna_kernels.report", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.stdout.strip().startswith("["), done.stderr[-3000:]
    return json.loads(done.stdout), done.returncode


def test_report_covers_every_kernel_and_arch(report_rows):
    rows, _ = report_rows
    keys = {"kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "mma"}
    assert all(keys <= set(row) for row in rows)
    seen = {(row["kernel"], row["arch"]) for row in rows}
    assert seen == {(k, f"sm_{a}") for k in KERNELS for a in (80, 86, 89, 90)}
    for kernel in KERNELS:
        for arch in (80, 86, 89, 90):
            for dtype in ("bf16", "fp16"):
                configs = [r for r in rows if (r["kernel"], r["arch"], r["dtype"]) == (kernel, f"sm_{arch}", dtype)]
                assert [r["config"] for r in configs] == [c.label() for c in candidate_configs(kernel, arch)]
                assert [r["default"] for r in configs] == [True] + [False] * (len(configs) - 1)
                assert configs[0]["config"] == default_config(kernel, arch).label()


def test_every_config_has_no_spills_fits_shared_memory_and_uses_mma(report_rows):
    rows, returncode = report_rows
    for row in rows:
        where = f"{row['kernel']} {row['arch']} {row['dtype']} {row['config']}"
        assert row["spill_bytes"] == 0 and row["spill_instructions"] == 0, f"spills in {where}"
        assert row["mma"], f"no tensor-core instructions in {where}"
        if row["arch"] in ("sm_86", "sm_89"):
            assert row["shared_bytes"] <= 99 * 1024, f"{where} needs {row['shared_bytes']} B of shared memory"
        assert row["shared_bytes"] <= row["shared_limit"]
        assert 0 < row["registers"] <= 255
    assert returncode == 0
