"""The static GPU report for the peers' Triton kernels, compiled the way they launch by default.

Cut Cross-Entropy (without CCE_AUTOTUNE) launches its forward and backward kernels with one fixed
configuration each; the heuristics it attaches to them are evaluated here on the arguments of a
bf16 launch (D a multiple of 16, no softcap, gradient filtering on, as its defaults are). Liger-Kernel's
fused linear losses do their matmuls in torch (cuBLAS) and its preference losses use torch.compile, so
they have no Triton matmul kernel to report.
"""

from __future__ import annotations

from typing import Dict, List

from tuna_kernels.devtools.report import SHARED_LIMIT, compile_and_inspect

# Pointer arguments that a bf16 CCE launch passes, and their element types; None = passed as None.
_CCE_POINTERS = {
    "E": "*bf16", "C": "*bf16", "LSE": "*fp32", "LA": None, "Locks": "*i32", "Valids": None,
    "dOut": "*fp32", "VocabOrdering": None, "Targets": "*i64", "dE": "*bf16", "dELocks": "*i32",
    "dC": "*bf16", "dCLocks": "*i32",
}
_CCE_FLOATS = {"softcap": None, "grad_scale": "fp32", "filter_eps": "fp32"}
_CCE_SIZES = {"B": 8192, "V": 128256, "D": 4096}


class _Pointer:
    """Stands for a tensor argument when the heuristics are evaluated (per-token, so numel() = B)."""

    def numel(self) -> int:
        return _CCE_SIZES["B"]


def _unwrap(kernel):
    """(JITFunction, [heuristics dicts]) under triton.heuristics / autotune wrappers."""
    heuristics = []
    while not hasattr(kernel, "arg_names") or hasattr(kernel, "values") or hasattr(kernel, "configs"):
        if hasattr(kernel, "values"):
            heuristics.append(kernel.values)
        kernel = kernel.fn
    return kernel, heuristics


def _cce_compile_args(kernel, config: Dict[str, int]):
    jit_fn, heuristics = _unwrap(kernel)
    args = {}
    for name in jit_fn.arg_names:
        if name in _CCE_POINTERS:
            args[name] = None if _CCE_POINTERS[name] is None else _Pointer()
        elif name in _CCE_FLOATS:
            args[name] = None if _CCE_FLOATS[name] is None else 1e-4
        elif name in _CCE_SIZES:
            args[name] = _CCE_SIZES[name]
        else:
            args[name] = 1
    args.update(config)
    args["REQUIRES_GRAD"] = True
    args["SHIFT"] = False
    for table in reversed(heuristics):
        for name, rule in table.items():
            args[name] = rule(args)
    constexprs, signature, attrs = {}, {}, {}
    for index, name in enumerate(jit_fn.arg_names):
        param = jit_fn.params[index]
        if param.is_constexpr or args[name] is None or name in ("stride_ed", "stride_cd"):
            signature[name] = "constexpr"
            constexprs[name] = None if args[name] is None else (1 if name.startswith("stride_") and
                                                                 name.endswith("d") else args[name])
        elif name in _CCE_POINTERS:
            signature[name] = _CCE_POINTERS[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _CCE_FLOATS:
            signature[name] = _CCE_FLOATS[name]
        else:
            signature[name] = "i32"
            if name in ("D", "stride_eb", "stride_cv"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return jit_fn, signature, constexprs, attrs


def peer_rows(archs=(80, 86, 89, 90)) -> List[dict]:
    """Rows like tuna_kernels.devtools.report's for the peers' kernels; a row with ``error`` where one fails."""
    rows: List[dict] = []
    try:
        from cut_cross_entropy.cce_backward import _cce_backward_kernel
        from cut_cross_entropy.cce_lse_forward import _cce_lse_forward_kernel
        from cut_cross_entropy.tl_autotune import _cce_backward_best_config, _cce_forward_best_config
    except ImportError as error:
        return [{"kernel": "cut-cross-entropy", "error": f"not installed ({error})"}]
    for name, kernel, best in (("cce_lse_forward", _cce_lse_forward_kernel, _cce_forward_best_config()),
                               ("cce_backward", _cce_backward_kernel, _cce_backward_best_config())):
        config = dict(best.kwargs)
        label = (f"B{config['BLOCK_B']}_V{config['BLOCK_V']}_D{config['BLOCK_D']}"
                 f"_w{best.num_warps}_s{best.num_stages}")
        for arch in archs:
            row = {"kernel": name, "arch": f"sm_{arch}", "dtype": "bf16", "config": label,
                   "shared_limit": SHARED_LIMIT[arch]}
            try:
                jit_fn, signature, constexprs, attrs = _cce_compile_args(kernel, config)
                found = compile_and_inspect(jit_fn, signature, constexprs, attrs, arch, best.num_warps,
                                            best.num_stages)
                row.update(registers=found.registers, spill_bytes=found.spill_bytes,
                           spill_instructions=found.spill_instructions, shared_bytes=found.shared_bytes,
                           mma=found.mma_instructions > 0, mma_instructions=found.mma_instructions)
            except Exception as error:  # a peer's kernel that does not compile here is reported, not fatal
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append(row)
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(peer_rows(), indent=1))
