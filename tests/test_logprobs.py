"""token_logprobs / sequence_logprobs: Triton (interpreter) and chunked against the float64 reference."""

import pytest
import torch

from helpers import TOLERANCE, logprobs_and_grads, make_problem, rel_err
from tuna_kernels import sequence_logprobs, token_logprobs
from tuna_kernels.kernels import launch

# (N, D, V, bias, logit_scale, softcap, fraction of ignored positions). Interpreter tiles are 16 x 32 x 32,
# so these shapes cover: V not a multiple of the tile, N = 1, N not a multiple, D = 64 / 96 / 128.
SHAPES = [
    (1, 64, 97, False, 1.0, None, 0.0),
    (37, 64, 301, True, 0.7, None, 0.2),
    (16, 96, 256, False, 1.0, 2.5, 0.0),
    (45, 128, 130, True, 1.3, 4.0, 0.3),
    (50, 96, 517, False, 0.25, None, 0.5),
]


def check_against_reference(impl, dtype, shape, seed, **options):
    num_tokens, hidden_dim, vocab_size, with_bias, logit_scale, softcap, ignore_fraction = shape
    hidden, weight, bias, labels, grad_token = make_problem(
        num_tokens, hidden_dim, vocab_size, with_bias, ignore_fraction, dtype, seed)
    common = dict(logit_scale=logit_scale, softcap=softcap)
    got = logprobs_and_grads(impl, hidden, weight, bias, labels, grad_token, **common, **options)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    want = logprobs_and_grads("reference", as64(hidden), as64(weight), as64(bias), labels, grad_token, **common)
    names = ["logprobs", "grad_hidden", "grad_weight", "grad_bias"]
    assert got[0].dtype == torch.float32
    assert torch.all(got[0][labels == -100] == 0)
    for name, actual, expected in zip(names, got, want):
        assert torch.isfinite(actual).all(), name
        err = rel_err(actual, expected)
        assert err <= TOLERANCE[dtype], f"{impl} {dtype} {shape}: {name} relative error {err:.3g}"
    assert got[1].dtype == dtype and got[2].dtype == dtype


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(shape, dtype):
    check_against_reference("triton", dtype, shape, seed=SHAPES.index(shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_matches_reference(shape, dtype):
    # small chunks so that every shape spans several token and vocabulary chunks
    check_against_reference("chunked", dtype, shape, seed=SHAPES.index(shape), chunk_tokens=16, chunk_vocab=64)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_both_impls(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=generator))]  # noqa: E731
    shape = (int(torch.randint(1, 70, (1,), generator=generator)), pick([64, 96, 128]),
             int(torch.randint(2, 400, (1,), generator=generator)), pick([True, False]),
             pick([1.0, 0.5, 2.0]), pick([None, 3.0]), pick([0.0, 0.25]))
    check_against_reference("triton", torch.float32, shape, seed)
    check_against_reference("chunked", torch.float32, shape, seed, chunk_tokens=8, chunk_vocab=50)


def test_triton_deterministic_mode_is_bitwise_reproducible():
    shape = (45, 64, 301, True, 1.0, 3.0, 0.2)
    check_against_reference("triton", torch.float32, shape, seed=5, deterministic=True)
    hidden, weight, bias, labels, grad_token = make_problem(45, 64, 301, True, 0.2, torch.float32, seed=5)
    first = logprobs_and_grads("triton", hidden, weight, bias, labels, grad_token, deterministic=True)
    second = logprobs_and_grads("triton", hidden, weight, bias, labels, grad_token, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic_backward_recomputes_each_tile_once_and_splits_the_vocabulary(monkeypatch):
    """Deterministic mode is one kernel, one program per (token tile, vocabulary split): each logit tile is
    recomputed once (the splits cover the vocabulary once per token tile), grad_hidden goes to fp32
    partial rows summed in a fixed order (a GPU is filled at small N), and the token tiles take their turns
    at every grad_weight tile (each ticket ends at the number of token tiles). Right against float64, and
    the same to rounding as the whole vocabulary in one split."""
    launches = []
    real_kernel = launch.logprob_backward_ordered_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                real_kernel[grid](*args, **kwargs)
                launches.append((grid, kwargs["vocab_per_split"], kwargs["vocab_size"], args[9].clone()))
            return run

    monkeypatch.setattr(launch, "logprob_backward_ordered_kernel", Spy())
    monkeypatch.setattr(launch, "logprob_backward_atomic_kernel", None)  # deterministic: never the atomic one
    shape = (45, 64, 301, True, 1.0, 3.0, 0.2)
    check_against_reference("triton", torch.float32, shape, seed=5, deterministic=True)
    (grid, vocab_per_split, vocab_size, tickets), = launches
    problem = make_problem(45, 64, 301, True, 0.2, torch.float32, seed=5)
    target_rows = int((problem[3] != -100).sum())  # the rows with a target (and a non-zero gradient)
    token_tiles = -(-target_rows // launch.launch_config("backward_ordered", None).block_n)
    splits = grid[0] // token_tiles
    assert token_tiles >= 2 and grid == (token_tiles * splits,)
    assert splits >= 2 and (splits - 1) * vocab_per_split < vocab_size <= splits * vocab_per_split
    # every program started once, and every token tile took its turn at every vocabulary tile
    assert tickets.tolist() == [grid[0]] + [token_tiles] * (len(tickets) - 1)
    split = logprobs_and_grads("triton", *problem, deterministic=True)
    monkeypatch.setattr(launch, "SPLIT_ROWS_BYTES", 0)  # no room for partial rows: one split
    whole = logprobs_and_grads("triton", *problem, deterministic=True)
    assert launches[-1][0][0] == token_tiles  # one split
    for got, expected in zip(split, whole):
        assert rel_err(got, expected) < 1e-6


def test_sequence_logprobs_sums_counts_and_empty_sequence():
    hidden, weight, bias, labels, _ = make_problem(40, 64, 200, False, 0.0, torch.float32, seed=3)
    seq_index = torch.arange(40) // 10  # four sequences of 10 tokens
    labels[20:30] = -100  # sequence 2 has no target token
    seq_index[20:30] = -1  # positions without a target may hold any index
    seq_grad = torch.tensor([0.3, -1.2, 0.7, 2.0, -0.5])
    results = {}
    for impl in ("triton", "chunked", "reference"):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        sums, counts = sequence_logprobs(h, w, labels, seq_index, 5, impl=impl)
        grads = torch.autograd.grad((sums * seq_grad).sum(), (h, w))
        results[impl] = (sums, counts) + grads
    sums, counts = results["reference"][:2]
    assert counts.tolist() == [10, 10, 0, 10, 0]
    assert sums[2] == 0 and sums[4] == 0
    token_lp = token_logprobs(hidden.double(), weight.double(), labels, impl="reference")
    expected = torch.stack([token_lp[i * 10:(i + 1) * 10].sum() for i in range(4)] + [token_lp.new_zeros(())])
    assert rel_err(sums, expected) <= 1e-6
    for impl in ("triton", "chunked"):
        got = results[impl]
        assert torch.equal(got[1], counts)
        assert not any(torch.isnan(t).any() for t in (got[0], got[2], got[3]))
        for actual, want in zip(got[2:], results["reference"][2:]):
            assert rel_err(actual, want) <= 1e-5


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_non_contiguous_inputs(impl):
    hidden, weight, bias, labels, grad_token = make_problem(33, 64, 150, False, 0.1, torch.float32, seed=9)
    wide = torch.randn(33, 128)
    wide[:, ::2] = hidden
    strided_hidden = wide[:, ::2]  # stride (128, 2)
    transposed_weight = weight.T.contiguous().T  # stride (1, 150): a tied embedding read through .T
    assert not strided_hidden.is_contiguous() and not transposed_weight.is_contiguous()
    got = logprobs_and_grads(impl, strided_hidden, transposed_weight, None, labels, grad_token)
    want = logprobs_and_grads("reference", hidden.double(), weight.double(), None, labels, grad_token)
    for actual, expected in zip(got, want):
        assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_scoring_under_no_grad(impl):
    hidden, weight, _, labels, _ = make_problem(20, 64, 100, False, 0.0, torch.float32, seed=1)
    with torch.no_grad():
        token_lp = token_logprobs(hidden.requires_grad_(), weight, labels, impl=impl)
    assert not token_lp.requires_grad
    assert rel_err(token_lp, token_logprobs(hidden.double(), weight.double(), labels, impl="reference")) <= 1e-5


def test_only_needed_gradients_are_computed():
    """A frozen lm_head (LoRA) gets no weight gradient; the hidden gradient is still right."""
    hidden, weight, _, labels, grad_token = make_problem(30, 64, 100, False, 0.0, torch.float32, seed=2)
    expected = logprobs_and_grads("reference", hidden.double(), weight.double(), None, labels, grad_token)[1]
    for impl in ("triton", "chunked"):
        h = hidden.clone().requires_grad_()
        token_lp = token_logprobs(h, weight, labels, impl=impl)
        (token_lp * grad_token).sum().backward()
        assert weight.grad is None
        assert rel_err(h.grad, expected) <= 1e-5


def filter_case(case):
    """(hidden, weight, labels, grad_token, eps) of a gradient-filtering case."""
    hidden, weight, _, labels, grad_token = make_problem(48, 64, 320, False, 0.0, torch.float32, seed=4)
    if case == "tiny":  # only two vocabulary tiles of tiny probabilities (about e^-16 / 320) are dropped
        hidden[:, 0] = 4.0
        weight[64:128, 0] = -4.0
        labels[(labels >= 64) & (labels < 128)] = 0
        grad_token[16:32] *= 1e-4  # tiny upstream gradients: their tiles are not filtered for that
        return hidden, weight, labels, grad_token, 2.0 ** -10
    # "spread": near-uniform probabilities (about 1/320) and every target in the first vocabulary tile, so
    # every other tile is dropped, and what it drops shows in the gradients
    return hidden, weight * 0.05, labels % 32, grad_token, 0.02


@pytest.mark.parametrize("case", ["tiny", "spread"])
def test_gradient_filter_skips_exactly_the_small_tiles(monkeypatch, case):
    """With grad_filter_eps, a tile whose largest |onehot - p| is <= eps contributes nothing to the matmul
    gradients, whatever the upstream gradient's scale (Cut Cross-Entropy's definition); every other tile is
    exact. Checked against float64 dz with those tiles zeroed, for Triton (its tiles) and chunked (blocks
    of the same size inside chunks that are multiples of them)."""
    from tuna_kernels import filtering
    from tuna_kernels.kernels.configs import INTERPRETER

    monkeypatch.setattr(filtering, "FILTER_BLOCK", (INTERPRETER.block_n, INTERPRETER.block_v))
    hidden, weight, labels, grad_token, eps = filter_case(case)
    logits = hidden.double() @ weight.double().T
    residual = torch.nn.functional.one_hot(labels, 320).double() - torch.softmax(logits, dim=-1)
    dz = grad_token.double()[:, None] * residual
    shape = (48 // INTERPRETER.block_n, INTERPRETER.block_n, 320 // INTERPRETER.block_v, INTERPRETER.block_v)
    kept = residual.reshape(shape).abs().amax(dim=(1, 3), keepdim=True) > eps
    assert 0 < int(kept.sum()) < kept.numel(), "the case must filter some tiles and keep others"
    if case == "tiny":
        assert bool(kept[1, :, 4:].all()), "tiny upstream gradients alone must not filter a tile"
    dz_kept = (dz.reshape(shape) * kept).reshape(48, 320)
    # "tiny" drops terms of about 1e-10 (filtering must not break the rest); "spread" must show the filter
    assert (rel_err(dz_kept @ weight.double(), dz @ weight.double()) > 1e-2) == (case == "spread")
    runs = [dict(impl="triton", deterministic=False), dict(impl="triton", deterministic=True),
            dict(impl="chunked", chunk_tokens=2 * INTERPRETER.block_n, chunk_vocab=3 * INTERPRETER.block_v)]
    for options in runs:
        impl = options.pop("impl")
        _, grad_hidden, grad_weight = logprobs_and_grads(impl, hidden, weight, None, labels, grad_token,
                                                         grad_filter_eps=eps, **options)
        assert rel_err(grad_hidden, dz_kept @ weight.double()) <= 1e-5, impl
        assert rel_err(grad_weight, dz_kept.T @ hidden.double()) <= 1e-5, impl


def test_gradient_filter_auto_threshold_per_dtype():
    from tuna_kernels.filtering import filter_threshold

    assert filter_threshold("auto", torch.bfloat16) == 2.0 ** -8
    assert filter_threshold("auto", torch.float16) == 2.0 ** -11
    assert filter_threshold("auto", torch.float32) == 2.0 ** -24
    assert filter_threshold(1e-3, torch.float32) == 1e-3


@pytest.mark.parametrize("deterministic", [False, True])
def test_autotuning_trials_leave_no_trace_and_run_once_per_shape_bucket(monkeypatch, deterministic):
    """Autotuning (interpreter candidates) with a timer that runs each trial three times and prefers the
    last candidate: the results still match the float64 reference (a trial that left gradients behind in
    the accumulated outputs would triple them), and a second call of the same shape bucket times nothing."""
    from tuna_kernels.kernels import autotune, launch
    from tuna_kernels.kernels.configs import candidate_configs

    calls = {"n": 0}

    def timer(run):
        for _ in range(3):
            run()
        calls["n"] += 1
        return -calls["n"]  # later candidates look faster: the tuned choice is not the default

    tuner = autotune.Autotuner(timer=timer)
    monkeypatch.setattr(launch, "TUNER", tuner)
    shape = (37, 64, 301, True, 0.7, None, 0.2)
    check_against_reference("triton", torch.float32, shape, seed=11, autotune=True, deterministic=deterministic)
    kernels = ["lse_forward"] + (["backward_ordered"] if deterministic else ["backward_atomic"])
    assert tuner.trials == sum(len(candidate_configs(k, None)) for k in kernels)
    assert {key[0] for key in tuner.chosen()} == set(kernels)
    assert all(config == candidate_configs(key[0], None)[-1] for key, config in tuner.chosen().items())

    trials = tuner.trials
    check_against_reference("triton", torch.float32, (50, 64, 301, True, 0.7, None, 0.2), seed=12, autotune=True,
                            deterministic=deterministic)  # up to 64 target tokens share a bucket
    assert tuner.trials == trials
    check_against_reference("triton", torch.float32, (90, 64, 301, True, 0.7, None, 0.0), seed=13, autotune=True,
                            deterministic=deterministic)  # 90 target tokens: the next bucket is tuned anew
    assert tuner.trials == 2 * trials
