"""The static GPU report: every configuration a kernel can launch with compiles for sm_80/86/89/90 and every
input dtype (bf16, fp16, fp32) with no spills, within shared memory, with tensor-core instructions for
16-bit inputs, without fenced atomics (the deterministic backward: no float atomic and one fence, its
tickets' hand-over), and with at least the resident blocks per SM chosen for it. Needs no GPU (ahead-of-time
compilation); takes minutes, hence ``slow``: the defaults in one test, the autotuning candidates in another,
from one run of the report compiling in parallel."""

import json
import os
import subprocess
import sys

import pytest

from tuna_kernels.devtools.report import HANDOVER_FENCES
from tuna_kernels.kernels.configs import KERNELS, MIN_BLOCKS_PER_SM, candidate_configs, default_config

ARCHS = (80, 86, 89, 90)
DTYPES = ("bf16", "fp16", "fp32")


def run_report(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tuna_kernels.devtools.report", "--json", *flags], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.stdout.strip().startswith("["), done.stderr[-3000:]
    return json.loads(done.stdout), done.returncode


def check_rows(rows):
    for row in rows:
        where = f"{row['kernel']} {row['arch']} {row['dtype']} {row['config']}"
        assert row["spill_bytes"] == 0 and row["spill_instructions"] == 0, f"spills in {where}"
        if row["dtype"] != "fp32":  # fp32 compiles IEEE FMAs (torch's default fp32 matmul precision)
            assert row["mma"], f"no tensor-core instructions in {where}"
        if row["arch"] in ("sm_86", "sm_89"):
            assert row["shared_bytes"] <= 99 * 1024, f"{where} needs {row['shared_bytes']} B of shared memory"
        assert row["shared_bytes"] <= row["shared_limit"]
        assert 0 < row["registers"] <= 255
        if row["kernel"] == "backward_ordered":
            # deterministic: no gradient added by an atomic; one fence, the ticket hand-over's release per tile
            assert row["float_atomics"] == 0, f"float atomics in {where}"
            assert row["fenced_atomics"] == HANDOVER_FENCES["backward_ordered"] == 1, f"fences in {where}"
            assert row["l1_invalidates"] >= 1, f"no acquire (CCTL.IVALL) in {where}: a turn could read stale sums"
        else:
            assert row["fenced_atomics"] == 0, f"fenced (acq_rel) atomics, MEMBAR in the SASS of {where}"
        if row["kernel"] == "backward_atomic":
            assert row["float_atomics"] > 0, f"no atomic found in {where}: the MEMBAR check would prove nothing"
        assert row["blocks_per_sm"] >= MIN_BLOCKS_PER_SM[row["kernel"]], f"occupancy of {where}"


@pytest.fixture(scope="module")
def every_config():
    """The whole report (defaults and candidates) compiled once for both tests."""
    return run_report()


@pytest.mark.slow
def test_default_configs_no_spills_no_fences_occupancy(every_config):
    rows, returncode = every_config
    rows = [row for row in rows if row["default"]]
    seen = {(row["kernel"], row["arch"], row["dtype"]) for row in rows}
    assert seen == {(k, f"sm_{a}", d) for k in KERNELS for a in ARCHS for d in DTYPES}
    for row in rows:
        assert row["config"] == default_config(row["kernel"], int(row["arch"][3:]), row["dtype"]).label()
    check_rows(rows)
    assert returncode == 0


@pytest.mark.slow
def test_every_autotuning_candidate_no_spills_no_fences_occupancy(every_config):
    rows, returncode = every_config
    for kernel in KERNELS:
        for arch in ARCHS:
            for dtype in DTYPES:
                configs = [r for r in rows if (r["kernel"], r["arch"], r["dtype"]) == (kernel, f"sm_{arch}", dtype)]
                assert [r["config"] for r in configs] == [c.label() for c in candidate_configs(kernel, arch, dtype)]
                assert [r["default"] for r in configs] == [True] + [False] * (len(configs) - 1)
    check_rows(rows)
    assert returncode == 0


def test_resident_blocks_follow_each_limit():
    """The occupancy rule against hand-computed cases: registers, shared memory, threads, block count."""
    from tuna_kernels.devtools.report import resident_blocks

    assert resident_blocks(86, registers=160, shared_bytes=44 * 1024, num_warps=8) == 1  # 160*256 regs/block
    assert resident_blocks(86, registers=128, shared_bytes=20 * 1024, num_warps=4) == 4  # 65536 / (128*128)
    assert resident_blocks(86, registers=32, shared_bytes=60 * 1024, num_warps=4) == 1  # 100 KB of smem
    assert resident_blocks(86, registers=32, shared_bytes=0, num_warps=8) == 6  # 1536 threads
    assert resident_blocks(80, registers=32, shared_bytes=0, num_warps=8) == 8  # 2048 threads
    assert resident_blocks(86, registers=16, shared_bytes=0, num_warps=1) == 16  # block limit
    assert resident_blocks(86, registers=255, shared_bytes=120 * 1024, num_warps=4) == 0  # does not fit


def test_roofline_forward_estimate_by_hand():
    """The model's forward on A100 at N=8192, V=256000, D=2304 with 64 x 128 tiles is L2-bound: its L2
    operand traffic over the L2 bandwidth, computed here by hand."""
    from tuna_kernels.devtools.roofline import GPUS, estimate
    from tuna_kernels.kernels.configs import default_config

    a100 = GPUS[0]
    tile = default_config("lse_forward", 80, "bf16")
    n, v, d = 8192, 256000, 2304
    flop_time = 2 * n * v * d / 312e12
    l2_time = ((n / tile.block_n) * v * d * 2 + (v / tile.block_v) * n * d * 2) / 5.5e12
    assert estimate(a100, n, v, d)["ours forward"] == pytest.approx(max(flop_time, l2_time), rel=1e-9)
