"""Public log-likelihood functions: argument checks and the one dispatch between implementations.

Every implementation computes, for each token t with hidden state ``h_t`` and target ``y_t``::

    z_t      = logit_scale * (h_t @ weight.T) + bias             # [V], never stored as [N, V]
    z_t      = softcap * tanh(z_t / softcap)                     # only when softcap is set
    logp_t   = z_t[y_t] - logsumexp(z_t)                         # 0 where y_t == ignore_index

``impl`` picks the implementation:

- ``"triton"``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"chunked"``: pure PyTorch, any device, token x vocabulary chunks with an online log-sum-exp;
- ``"reference"``: materialises the logits, float64-capable; for tests only;
- ``"auto"``: ``"triton"`` on CUDA tensors, ``"chunked"`` otherwise.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Optional, Tuple

import torch

from .autograd import FusedLinearNll, FusedTokenLogprobs
from .chunked import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB, ChunkedBackend
from .filtering import check_filter_eps, filter_threshold
from .reference import reference_token_logprobs

IMPLS = ("auto", "triton", "chunked", "reference")
REDUCTIONS = ("mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    logit_scale: float,
    softcap: Optional[float],
    ignore_index: int,
) -> None:
    """Raise a ValueError/TypeError naming the argument at fault; runs before any kernel."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating tensor (fp16, bf16, fp32, fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if labels.dtype not in _INDEX_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight is [V, D] = {tuple(weight.shape)} but hidden is [N, D] = {tuple(hidden.shape)}: D differs"
        )
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but hidden has N = {hidden.shape[0]} rows")
    if weight.shape[0] == 0:
        raise ValueError("weight has V = 0 rows: the vocabulary is empty")
    devices = {("hidden", hidden.device), ("weight", weight.device), ("labels", labels.device)}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        devices.add(("bias", bias.device))
    if len({device for _, device in devices}) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    vocab_size = weight.shape[0]
    out_of_range = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(out_of_range.any()):
        first = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"labels[{first}] = {int(labels[first])} is outside [0, V={vocab_size}) "
            f"and is not ignore_index={ignore_index}"
        )


def _follow_autocast(hidden, weight, bias):
    """The dtype policy, applied once at the entry: under autocast for the input's device, hidden, weight
    and bias are cast to the autocast dtype, as ``nn.Linear`` casts its input and parameters (the cast is
    differentiable: fp32 leaves get fp32 gradients). float64 tensors are left alone, as autocast does.
    Accumulation stays fp32 and outputs are fp32 whatever the input dtype.
    Returns (hidden, weight, bias, device type whose autocast must be off inside, or None)."""
    if not isinstance(hidden, torch.Tensor):
        return hidden, weight, bias, None
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias, None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return tensor.to(dtype)
        return tensor

    return cast(hidden), cast(weight), cast(bias), device_type


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {device}); on CPU it runs only under TRITON_INTERPRET=1. "
            "Use impl='chunked' or impl='auto'."
        )
    return impl


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_tokens: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
    deterministic: bool = False,
    grad_filter_eps: Optional[float] = None,
    autotune: Optional[bool] = None,
) -> torch.Tensor:
    """Log-probability of each target token, without materialising the [N, V] logits.

    Args:
        hidden: [N, D] final hidden states of the positions that predict ``labels`` (already shifted).
        weight: [V, D] lm_head weight (same dtype as ``hidden``; under autocast any float dtypes: both
            are cast to the autocast dtype first, as ``nn.Linear`` does).
        labels: [N] int64/int32 target ids; ``ignore_index`` marks positions with no target.
        bias: optional [V] lm_head bias.
        logit_scale: multiplies the logits before bias and softcap (Cohere-style ``logit_scale``).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma-2 style).
        impl: ``"auto"``, ``"triton"``, ``"chunked"`` or ``"reference"``.
        chunk_tokens, chunk_vocab: tile sizes of the chunked implementation (defaults 1024 x 4096).
        deterministic: Triton backward without float atomics (bit-reproducible; token tiles add to each
            grad_weight tile in turn).
        grad_filter_eps: the backward skips tiles whose largest |onehot - p| is at most this value and
            that hold no NaN (Cut Cross-Entropy's gradient filtering; independent of the loss scale): Triton
            its tiles, chunked the same 64 x 128 blocks of its chunks (zeroed, for fidelity, not speed);
            ``"auto"`` uses the input dtype's unit roundoff (bf16 2^-8, fp16 2^-11, fp32 2^-24);
            ``None`` (default) or 0 computes every tile.
        autotune: Triton kernels time their candidate configurations once per shape bucket and keep the
            fastest; ``None`` (default) reads the ``TUNA_AUTOTUNE`` environment variable ("1" = on).

    Returns:
        [N] float32 (float64 for float64 inputs) log p(labels[t]), 0 at ignored positions.
        Differentiable with respect to ``hidden``, ``weight`` and ``bias`` for any upstream gradient.
    """
    return _fused(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, impl, chunk_tokens, chunk_vocab,
                  deterministic, grad_filter_eps, autotune, summed_nll=False)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    **options,
) -> torch.Tensor:
    """Token cross-entropy ``-logp_t`` of :func:`token_logprobs`, averaged (``reduction="mean"``, over the
    target tokens; NaN when there is none, as ``F.cross_entropy``) or summed (``"sum"``) into one number.

    ``options``: the keyword options of :func:`token_logprobs`, by name (porting from ``F.linear_cross_entropy``:
    the bias is ``bias=``, per-token losses are ``-token_logprobs(...)``; no label smoothing or class weights).
    Because the loss is a
    scalar, every token's upstream gradient is known at the forward up to one number, and the chunked
    implementation forms the gradients while it has each logit tile: three N x V x D products (logits,
    grad_hidden, grad_weight) against four for ``token_logprobs(...).sum()`` (whose backward must recompute the
    logits). It does so for a trainable fp32/fp64 head at any vocabulary size (see
    ``ChunkedBackend.nll_with_grads_fits`` and ``nll_rows``); otherwise, and for ``impl="triton"`` /
    ``"reference"``, it reduces :func:`token_logprobs`.

    Returns:
        [] float32 (float64 for float64 inputs), differentiable with respect to hidden, weight and bias.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # token_logprobs' signature declares the options once: an unknown name is a TypeError naming it
    try:
        arguments = _TOKEN_LOGPROBS_SIGNATURE.bind(hidden, weight, labels, **options)
    except TypeError as error:
        raise TypeError(f"linear_cross_entropy() {error}") from None
    arguments.apply_defaults()
    total = _fused(**arguments.arguments, summed_nll=True)
    if reduction == "sum":
        return total
    # a mean over no target is NaN with zero (not NaN) gradients, as F.cross_entropy's; no host sync
    num_targets = (labels != arguments.arguments["ignore_index"]).sum()
    return torch.where(num_targets > 0, total / num_targets.clamp(min=1), float("nan"))


_TOKEN_LOGPROBS_SIGNATURE = inspect.signature(token_logprobs)
# help(linear_cross_entropy) and IDEs list every option it takes, not **options
linear_cross_entropy.__signature__ = _TOKEN_LOGPROBS_SIGNATURE.replace(parameters=[
    *list(_TOKEN_LOGPROBS_SIGNATURE.parameters.values())[:3],
    inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default="mean", annotation="str"),
    *list(_TOKEN_LOGPROBS_SIGNATURE.parameters.values())[3:],
])


def _fused(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, impl, chunk_tokens, chunk_vocab,
           deterministic, grad_filter_eps, autotune, summed_nll: bool):
    """The entry both public functions share: :func:`_prepare`, then :func:`_dispatch` with autocast off."""
    hidden, weight, bias, impl, autocast_device, grad_filter_eps = _prepare(
        hidden, weight, labels, bias, logit_scale, softcap, ignore_index, impl, grad_filter_eps)
    with _autocast_off(autocast_device):
        return _dispatch(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, impl,
                         chunk_tokens, chunk_vocab, deterministic, grad_filter_eps, autotune, summed_nll)


def _prepare(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, impl, grad_filter_eps):
    """The entry of every public function, before any kernel: the dtype policy, then argument checks naming
    the argument at fault, then the implementation. Returns (hidden, weight, bias, impl, autocast device,
    grad_filter_eps), with a ``grad_filter_eps`` of 0 made None: 0 and None both mean off, everywhere."""
    hidden, weight, bias, autocast_device = _follow_autocast(hidden, weight, bias)
    _check_inputs(hidden, weight, labels, bias, logit_scale, softcap, ignore_index)
    check_filter_eps(grad_filter_eps)
    grad_filter_eps = None if grad_filter_eps == 0 else grad_filter_eps
    return hidden, weight, bias, _resolve_impl(impl, hidden.device), autocast_device, grad_filter_eps


def _autocast_off(device_type: Optional[str]):
    """Inside the dispatch every matmul keeps the dtypes it is given (the inputs are already in the
    autocast dtype): autocast is switched off for ``device_type``, if one was on."""
    return torch.autocast(device_type, enabled=False) if device_type is not None else contextlib.nullcontext()


def _chunked_backend(chunk_tokens: Optional[int], chunk_vocab: Optional[int], grad_filter_eps,
                     dtype: torch.dtype) -> ChunkedBackend:
    return ChunkedBackend(
        DEFAULT_CHUNK_TOKENS if chunk_tokens is None else int(chunk_tokens),
        DEFAULT_CHUNK_VOCAB if chunk_vocab is None else int(chunk_vocab),
        None if grad_filter_eps is None else filter_threshold(grad_filter_eps, dtype),
    )


def _dispatch(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, impl,
              chunk_tokens, chunk_vocab, deterministic, grad_filter_eps, autotune, summed_nll: bool = False):
    """The one dispatch between implementations (inputs already checked): the per-token log-probabilities
    [N], or with ``summed_nll`` their negated sum [] (``linear_cross_entropy``), which the chunked backend forms
    with its gradients in one sweep when they fit (``ChunkedBackend.nll_with_grads_fits``)."""
    logit_scale = float(logit_scale)
    softcap = None if softcap is None else float(softcap)
    if impl == "reference":
        logprobs = reference_token_logprobs(hidden, weight, labels, bias, logit_scale, softcap, ignore_index)
    else:
        if impl == "chunked":
            backend = _chunked_backend(chunk_tokens, chunk_vocab, grad_filter_eps, hidden.dtype)
            # without grad mode (evaluation) the forward alone is one product on either path
            if summed_nll and backend.nll_with_grads_fits(weight, torch.is_grad_enabled() and weight.requires_grad):
                return FusedLinearNll.apply(backend, hidden, weight, bias, labels, logit_scale, softcap, ignore_index)
        else:
            if hidden.dtype == torch.float64:
                raise TypeError("impl='triton' supports fp16, bf16 and fp32 inputs, not float64; use impl='chunked'")
            from .kernels.launch import TritonBackend  # imports triton: an optional dependency off Linux

            if autotune is None:
                autotune = os.environ.get("TUNA_AUTOTUNE", "0") == "1"
            backend = TritonBackend(deterministic=bool(deterministic), grad_filter_eps=grad_filter_eps,
                                    autotune=bool(autotune))
        logprobs = FusedTokenLogprobs.apply(backend, hidden, weight, bias, labels, logit_scale, softcap,
                                            ignore_index)
    return -logprobs.sum() if summed_nll else logprobs


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    **options,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token log-probabilities and the number of target tokens.

    Args:
        hidden: [N, D], weight: [V, D], labels: [N] as in :func:`token_logprobs`.
        seq_index: [N] int, the sequence in [0, num_seqs) each token belongs to. Positions whose label is
            ``ignore_index`` may hold any value (they count for no sequence).
        num_seqs: S, the number of sequences (a sequence may have no target token: sum 0, count 0).
        **options: the keyword options of :func:`token_logprobs`.

    Returns:
        (sums [S] float32, counts [S] int64) with ``sums[s] = sum_{t: seq_index[t] = s} logp_t``.
        ``sums`` is differentiable; the upstream gradient of a token is that of its sequence.
    """
    if not isinstance(seq_index, torch.Tensor) or seq_index.dim() != 1:
        raise ValueError("seq_index must be a [N] tensor")
    if seq_index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"seq_index must be int64 or int32, got {seq_index.dtype}")
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 0:
        raise ValueError(f"num_seqs must be a non-negative int, got {num_seqs!r}")
    if isinstance(labels, torch.Tensor) and seq_index.shape[0] != labels.shape[0]:
        raise ValueError(f"seq_index has {seq_index.shape[0]} entries but labels has {labels.shape[0]}")
    if isinstance(labels, torch.Tensor) and seq_index.device != labels.device:
        raise ValueError(f"seq_index is on {seq_index.device} but labels is on {labels.device}")
    ignore_index = options.get("ignore_index", -100)
    is_target = labels != ignore_index
    bad = is_target & ((seq_index < 0) | (seq_index >= num_seqs))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"seq_index[{first}] = {int(seq_index[first])} is outside [0, num_seqs={num_seqs})")
    token_lp = token_logprobs(hidden, weight, labels, **options)
    target_seq = seq_index[is_target].long()
    sums = token_lp.new_zeros(num_seqs).index_add(0, target_seq, token_lp[is_target])
    counts = torch.bincount(target_seq, minlength=num_seqs)
    return sums, counts
