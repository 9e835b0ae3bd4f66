"""Input layouts and values that used to give silent wrong answers (issue 12), for the Triton kernels
(under the interpreter) and the chunked path, each against the float64 reference."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from helpers import logprobs_and_grads, make_problem, rel_err
from tuna_kernels.kernels.common import grouped_tile
from tuna_kernels.kernels.configs import KERNELS

IMPLS = ["triton", "chunked"]


def as64(tensor):
    return None if tensor is None else tensor.double()


def assert_matches_reference(impl, hidden, weight, bias, labels, grad_token, tolerance, **options):
    got = logprobs_and_grads(impl, hidden, weight, bias, labels, grad_token, **options)
    want = logprobs_and_grads("reference", as64(hidden), as64(weight), as64(bias), labels, grad_token,
                              **{k: v for k, v in options.items() if k in ("logit_scale", "softcap")})
    for name, actual, expected in zip(["logprobs", "grad_hidden", "grad_weight", "grad_bias"], got, want):
        assert torch.isfinite(actual).all(), f"{impl}: {name} is not finite"
        err = rel_err(actual, expected)
        assert err <= tolerance, f"{impl}: {name} relative error {err:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_labels_and_bias(impl):
    """labels a column of a [N, 2] tensor (every position a target), bias a strided view of [2V]."""
    hidden, weight, bias, labels, grad_token = make_problem(37, 64, 150, True, 0.0, torch.float32, seed=21)
    label_pairs = torch.stack([labels, torch.randint(0, 150, (37,))], dim=1)
    bias_pairs = torch.stack([bias, torch.randn(150)], dim=1).reshape(-1)
    strided_labels, strided_bias = label_pairs[:, 0], bias_pairs[::2]
    assert strided_labels.stride() == (2,) and strided_bias.stride() == (2,)
    assert torch.equal(strided_labels, labels) and torch.equal(strided_bias, bias)
    got = logprobs_and_grads(impl, hidden, weight, strided_bias, strided_labels, grad_token)
    want = logprobs_and_grads("reference", hidden.double(), weight.double(), bias.double(), labels, grad_token)
    for actual, expected in zip(got, want):
        assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_large_bias_with_padded_token_rows(impl):
    """A bias above 88.7 (exp overflows in fp32) and N = 37, not a multiple of the token tile: padded rows
    must not turn into 0 * inf = NaN in grad_weight / grad_bias."""
    hidden, weight, bias, labels, grad_token = make_problem(37, 64, 150, True, 0.0, torch.float32, seed=22)
    bias[::7] += 120.0
    assert_matches_reference(impl, hidden, weight, bias, labels, grad_token, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_gradient_propagates(impl):
    """A NaN upstream gradient makes its tokens' grad_hidden rows and every grad_weight entry NaN, as in the
    reference: a NaN tile must not be skipped (also with gradient filtering on, for Triton)."""
    hidden, weight, _, labels, grad_token = make_problem(40, 64, 130, False, 0.0, torch.float32, seed=23)
    grad_token[16:32] = float("nan")  # one whole token tile of the interpreter: every dz of its tiles is NaN
    want = logprobs_and_grads("reference", hidden.double(), weight.double(), None, labels, grad_token)
    options = [{}] + ([{"grad_filter_eps": 1e-3}, {"grad_filter_eps": 1e-3, "deterministic": True}]
                      if impl == "triton" else [])
    for option in options:
        got = logprobs_and_grads(impl, hidden, weight, None, labels, grad_token, **option)
        for actual, expected in zip(got[1:], want[1:]):
            assert torch.equal(torch.isnan(actual), torch.isnan(expected)), option
            finite = ~torch.isnan(expected)
            assert rel_err(actual[finite], expected[finite]) <= 1e-5


def assert_near_output_rounding(impl, grad_token, **options):
    """fp16 inputs, fp16 gradients: each gradient within 1.5x the error of rounding the exact (float64)
    gradient to fp16, the best any implementation can return."""
    hidden, weight, bias, labels, _ = make_problem(37, 64, 301, True, 0.0, torch.float16, seed=24)
    got = logprobs_and_grads(impl, hidden, weight, bias, labels, grad_token, **options)
    want = logprobs_and_grads("reference", hidden.double(), weight.double(), bias.double(), labels, grad_token)
    for name, actual, expected in zip(["grad_hidden", "grad_weight", "grad_bias"], got[1:], want[1:]):
        floor = rel_err(expected.half(), expected)
        err = rel_err(actual, expected)
        assert err <= 1.5 * floor + 1e-6, f"{impl} {options}: {name} relative error {err:.3g} (fp16 rounding {floor:.3g})"


def small_upstream_gradient():
    """g = 1e-4 (a mean over 10^4 tokens, no loss scaling): g * p is near or below fp16's smallest
    normal (6e-5) for most vocabulary entries, so dz must not be rounded to fp16 unscaled."""
    grad_token = torch.full((37,), 1e-4)
    grad_token[::3] = -2e-4
    return grad_token


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp16_small_upstream_gradient_does_not_underflow(deterministic):
    assert_near_output_rounding("triton", small_upstream_gradient(), deterministic=deterministic)


def test_chunked_fp16_small_upstream_gradient():
    assert_near_output_rounding("chunked", small_upstream_gradient(), chunk_tokens=16, chunk_vocab=64)


def test_hidden_dimension_offsets_are_64_bit():
    """cols * stride_wd passes 2^31 for a transposed weight view (stride (1, V)) once V * D does (V=256000,
    D >= 8389): every use of the hidden-dimension strides must be a widening to i64 first. Checked in each
    kernel's Triton IR (compiled in a subprocess, outside the interpreter), so no 8 GB tensor is needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from tuna_kernels.devtools.report import narrow_stride_uses; "
            "print(json.dumps({k: narrow_stride_uses(k) for k in %r}))" % (KERNELS,))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for kernel, (uses, narrow) in found.items():
        assert uses > 0, f"{kernel}: the IR names no stride argument, the check would prove nothing"
        assert not narrow, f"{kernel}: 32-bit use of a hidden-dimension stride:\n" + "\n".join(narrow)


@triton.jit
def order_kernel(out_ptr, num_n, num_v, GROUP_V: tl.constexpr):
    pid = tl.program_id(0)
    pid_n, pid_v = grouped_tile(pid, num_n, num_v, GROUP_V)
    tl.store(out_ptr + 2 * pid, pid_n)
    tl.store(out_ptr + 2 * pid + 1, pid_v)


@pytest.mark.parametrize("num_token_tiles,num_vocab_tiles,group", [(5, 19, 8), (3, 8, 8), (1, 3, 8), (4, 7, 2)])
def test_grouped_program_order_covers_every_tile_once(num_token_tiles, num_vocab_tiles, group):
    """The atomic backward's grouped order (interpreter): a bijection from program ids onto (token tile,
    vocabulary tile), with consecutive programs walking `group` vocabulary tiles of one token tile."""
    programs = num_token_tiles * num_vocab_tiles
    out = torch.full((programs, 2), -1, dtype=torch.int32)
    order_kernel[(programs,)](out, num_token_tiles, num_vocab_tiles, GROUP_V=group)
    pairs = [tuple(row) for row in out.tolist()]
    assert sorted(pairs) == [(n, v) for n in range(num_token_tiles) for v in range(num_vocab_tiles)]
    expected = [(n, v0 + v) for v0 in range(0, num_vocab_tiles, group) for n in range(num_token_tiles)
                for v in range(min(group, num_vocab_tiles - v0))]
    assert pairs == expected
