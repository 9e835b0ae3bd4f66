"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) over the module that holds the causal LM
and the fused loss, and the guard of the DeepSpeed ZeRO-3 configuration.

Why tuna applies FSDP itself: accelerate (1.15) switches to FSDP only on GPU process groups, so the same
launch on CPU processes (gloo) would silently fall back to data parallelism. Applying ``fully_shard`` here
gives one code path on CPU (tested, gloo) and on GPUs (NCCL): every transformer block is a shard unit, and
the root unit (embeddings, final norm, lm_head) is gathered for :class:`tuna_hf.FusedCausalLM`'s
forward, where the fused loss reads the lm_head weight, and resharded after the backward.

Checkpoints of a sharded run hold the *gathered* (full) trainable state and optimizer state, written by
the main process; a resumed run loads them and shards them again (with the same world size: the data order
depends on it).

DeepSpeed ZeRO-3 (the reference code's engine) is a configuration here, not a tested path: no DeepSpeed build
runs on these CPU machines. It uses the same module (the loss inside the root's forward, the lm_head weight
registered with the root so that ZeRO-3 gathers it there).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from tuna_hf.head import base_model, lm_head_spec

SHARDINGS = ("none", "fsdp", "deepspeed_zero3")


def check_sharding(config) -> None:
    """Refuse, before anything loads, what the sharding engine cannot do."""
    if config.sharding == "none":
        if config.fsdp_cpu_offload:
            raise ValueError("config field 'fsdp_cpu_offload' needs sharding 'fsdp'")
        return
    if config.load_in_4bit:
        raise ValueError(f"sharding '{config.sharding}' with load_in_4bit: bitsandbytes' 4-bit weights cannot be "
                         "sharded by this engine here; use sharding 'none' (QLoRA fits a 7B model on one 24 GB GPU) "
                         "or train LoRA on an unquantised (bf16) base with sharding 'fsdp'")
    if config.mixed_precision == "fp16":
        raise ValueError(f"sharding '{config.sharding}' with mixed_precision 'fp16' needs a sharded gradient scaler; "
                         "use mixed_precision 'bf16'")
    if config.sharding == "deepspeed_zero3":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError("sharding 'deepspeed_zero3' needs the deepspeed package (pip install deepspeed) and a "
                             "launch through `accelerate launch --config_file configs/accelerate_deepspeed_zero3.yaml`"
                             ) from None


def check_launch(config, distributed_type: str) -> None:
    """Refuse a launch whose engine disagrees with ``config.sharding`` (``distributed_type`` is accelerate's)."""
    if distributed_type == "FSDP":
        raise ValueError("this run was launched with accelerate's FSDP configuration; tuna applies FSDP2 itself: "
                         "launch with a plain multi-process configuration (or torchrun) and pass --sharding fsdp")
    if config.sharding == "deepspeed_zero3" and distributed_type != "DEEPSPEED":
        raise ValueError("sharding 'deepspeed_zero3' needs a DeepSpeed launch: accelerate launch --config_file "
                         "configs/accelerate_deepspeed_zero3.yaml -m tuna_train.cli train ...")
    if distributed_type == "DEEPSPEED" and config.sharding != "deepspeed_zero3":
        raise ValueError("this run was launched with DeepSpeed: pass --sharding deepspeed_zero3")


def transformer_blocks(model) -> List[torch.nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes, e.g. LlamaDecoderLayer)."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(base_model(model)).__name__} names no transformer block class "
                         "(_no_split_modules): cannot choose FSDP units")
    return blocks


def shard_fsdp(module: torch.nn.Module, cpu_offload: bool = False) -> torch.nn.Module:
    """``module`` (a FusedCausalLM) with every transformer block and then the root sharded by FSDP2.

    With ``cpu_offload`` the shards and their gradients live in CPU memory between uses (GPU runs).
    """
    offload = CPUOffloadPolicy() if cpu_offload and torch.cuda.is_available() else OffloadPolicy()
    for block in transformer_blocks(module.causal_lm):
        fully_shard(block, offload_policy=offload)
    fully_shard(module, offload_policy=offload)
    return module


def register_for_zero3(module: torch.nn.Module) -> None:
    """ZeRO-3 gathers a parameter for the forward of the module that owns it; the fused loss reads the lm_head
    weight in the root's forward instead, so it is registered there as an external parameter."""
    import deepspeed

    for tensor in lm_head_spec(module.causal_lm).parameters():
        deepspeed.zero.register_external_parameter(module, tensor)


def local_fraction(module: torch.nn.Module) -> float:
    """The fraction of the parameters' elements this process holds (1.0 unsharded, about 1/world sharded)."""
    local = total = 0
    for param in module.parameters():
        total += param.numel()
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    return local / max(total, 1)


def gathered_state(module: torch.nn.Module, trainable_only: bool = True) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state of ``module``'s parameters on the CPU; every process must call it."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable_only:
        keep = {name for name, p in module.named_parameters() if p.requires_grad}
        state = {name: tensor for name, tensor in state.items() if name in keep}
    return state


# names in a checkpoint are those of the causal LM (as an unsharded run writes them), not of the wrapper
_PREFIX = "causal_lm."


def training_state(module: torch.nn.Module, optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(trainable weights, optimizer state), both gathered in full on the CPU of the main process (empty on the
    others), named as the causal LM names its parameters; every process must call it."""
    weights = {name[len(_PREFIX):]: tensor for name, tensor in gathered_state(module).items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options)
    if not optimizer_state:  # gathered on the main process only (the one that writes)
        return weights, optimizer_state
    optimizer_state["state"] = {name[len(_PREFIX):]: value for name, value in optimizer_state["state"].items()}
    for group in optimizer_state["param_groups"]:
        group["params"] = [name[len(_PREFIX):] for name in group["params"]]
    return weights, optimizer_state


def restore_training_state(module: torch.nn.Module, optimizer, weights: Dict[str, torch.Tensor],
                           optimizer_state: Dict[str, Any]) -> None:
    """Load what :func:`training_state` gathered into the sharded ``module`` and its ``optimizer``: each
    process keeps its shards."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, {_PREFIX + name: tensor for name, tensor in weights.items()}, options=options)
    optimizer_state = dict(optimizer_state)
    optimizer_state["state"] = {_PREFIX + name: value for name, value in optimizer_state["state"].items()}
    optimizer_state["param_groups"] = [dict(group, params=[_PREFIX + name for name in group["params"]])
                                       for group in optimizer_state["param_groups"]]
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the gradients of (possibly sharded) parameters to ``max_norm``; the total norm over all shards."""
    grads = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)
