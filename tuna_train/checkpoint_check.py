"""What a checkpoint must hold before anything is loaded from it: each file checked against its ``manifest.json``
and against the run resuming it, refused in one line naming the file and what is wrong.

``manifest.json`` lists every file of the checkpoint with its size in bytes, and every tensor of
``trainable.safetensors`` with its shape and dtype::

    {"format": 1, "files": {"optimizer.pt": 41859, ...}, "tensors": {"lm_head.weight": {"shape": [384, 32],
     "dtype": "float32"}, ...}}

Without these checks ``Tensor.copy_`` broadcasts an ``lm_head.weight`` of shape [1, 32] (or a scalar) over the
[384, 32] parameter and casts a float16 one silently, and the run "finishes"; a file cut short surfaces as a
library's error that names no file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from .files import read_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: optimizer state entries shaped like their parameter (torch's AdamW and SGD)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read (named in the message)."""


Spec = Dict[str, Any]  # {"shape": [int, ...], "dtype": "float32"}


def tensor_spec(tensor: torch.Tensor) -> Spec:
    """The shape and dtype of ``tensor`` (a DTensor gives its full shape, as a sharded run saves it)."""
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def model_specs(model) -> Dict[str, Spec]:
    """What ``trainable.safetensors`` must hold for ``model``: each trainable parameter's shape and dtype."""
    return {name: tensor_spec(param) for name, param in model.named_parameters() if param.requires_grad}


def manifest_of(directory: Path, tensors: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The manifest of the checkpoint files written in ``directory`` (all but the manifest itself)."""
    files = {file.name: file.stat().st_size for file in sorted(directory.iterdir()) if file.name != MANIFEST}
    return {"format": MANIFEST_FORMAT, "files": files,
            "tensors": {name: tensor_spec(tensor) for name, tensor in tensors.items()}}


def read_manifest(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint's manifest, its structure checked; None for a checkpoint written before manifests."""
    path = checkpoint / MANIFEST
    if not path.exists():
        logger.warning("%s: no %s (written by an older version): its tensors are checked against the model only",
                       checkpoint, MANIFEST)
        return None
    manifest = read_json(path, dict, CheckpointError)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads {MANIFEST_FORMAT}")
    files, tensors = manifest.get("files"), manifest.get("tensors")
    if not isinstance(files, dict) or not all(isinstance(size, int) and size >= 0 for size in files.values()):
        raise CheckpointError(f"{path}: 'files' must map each file name to its size in bytes")
    if not isinstance(tensors, dict) or not all(_is_spec(spec) for spec in tensors.values()):
        raise CheckpointError(f"{path}: 'tensors' must map each tensor name to its shape (a list of sizes) and dtype")
    return manifest


def _is_spec(spec: Any) -> bool:
    return (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
            and all(isinstance(size, int) and size >= 0 for size in spec["shape"]))


def check_files(checkpoint: Path, manifest: Dict[str, Any]) -> None:
    """Every file the manifest lists is there with its size (a file cut short or replaced is refused)."""
    for name, size in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {checkpoint / MANIFEST}); the checkpoint is incomplete")
        found = path.stat().st_size
        if found != size:
            raise CheckpointError(f"{path}: {found} bytes, {checkpoint / MANIFEST} says {size}: cut short or "
                                  "changed since it was written")


def check_tensors(file: Path, tensors: Mapping[str, torch.Tensor], expected: Dict[str, Spec], against: str) -> None:
    """Each tensor of ``file`` has the name, shape and dtype ``expected`` (from ``against``) gives it; all there."""
    found = {name: tensor_spec(tensor) for name, tensor in tensors.items()}
    problems: List[str] = []
    for name in sorted(set(found) | set(expected)):
        if name not in expected:
            problems.append(f"tensor {name} {found[name]['shape']} is not in {against}")
        elif name not in found:
            problems.append(f"tensor {name} {expected[name]['shape']} of {against} is missing")
        else:
            for key in ("shape", "dtype"):
                if found[name][key] != expected[name][key]:
                    problems.append(f"tensor {name} has {key} {found[name][key]}, {against} has "
                                    f"{expected[name][key]}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{file}: {'; '.join(problems[:3])}{more}: was it written with another model or "
                              "LoRA setting?")


def check_state(file: Path, state: Dict[str, Any]) -> None:
    """``state.json``'s own fields: ``step`` (that of the directory name), ``world_size``, ``metrics_rows``
    (the run-state fields are checked by :meth:`RunState.from_dict`)."""
    step = state.get("step")
    if not _count(step):
        raise CheckpointError(f"{file}: 'step' must be a whole number >= 0, found {step!r}")
    named = _STEP_DIR.fullmatch(file.parent.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{file}: 'step' is {step}, but the checkpoint directory is {file.parent.name}")
    world_size = state.get("world_size", 1)
    if not _count(world_size) or world_size < 1:
        raise CheckpointError(f"{file}: 'world_size' must be a whole number >= 1, found {world_size!r}")
    if "metrics_rows" in state and not _count(state["metrics_rows"]):
        raise CheckpointError(f"{file}: 'metrics_rows' must be a whole number >= 0, found {state['metrics_rows']!r}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_optimizer_state(file: Path, saved: Any, optimizer) -> None:
    """``saved`` (an ``optimizer.state_dict()``) fits ``optimizer``: as many groups, of as many parameters,
    and the moment tensors shaped like their parameters."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])):
        raise CheckpointError(f"{file}: not an optimizer state (a 'state' dict and a 'param_groups' list of groups "
                              "with their 'params')")
    groups, ours = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(ours):
        raise CheckpointError(f"{file}: {len(groups)} parameter groups, this run's optimizer has {len(ours)}")
    for index, (group, own) in enumerate(zip(groups, ours)):
        if len(group["params"]) != len(own["params"]):
            raise CheckpointError(f"{file}: parameter group {index} has {len(group['params'])} parameters, this "
                                  f"run's has {len(own['params'])}")
        for key, param in zip(group["params"], own["params"]):
            entry = saved["state"].get(key, {})
            for moment in _MOMENTS:
                value = entry.get(moment) if isinstance(entry, dict) else None
                if isinstance(value, torch.Tensor) and value.shape != param.shape:
                    raise CheckpointError(f"{file}: {moment} of parameter {key} (group {index}) has shape "
                                          f"{list(value.shape)}, the parameter {list(param.shape)}")


def check_scheduler_state(file: Path, saved: Any, scheduler) -> None:
    """``saved`` (a ``scheduler.state_dict()``) has the entries of ``scheduler``'s, lists of the same lengths."""
    ours = scheduler.state_dict()
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: not a scheduler state (found {type(saved).__name__})")
    missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    if missing or extra:
        raise CheckpointError(f"{file}: not the state of this run's {type(scheduler).__name__}"
                              f"{f' (lacks {missing})' if missing else ''}{f' (has {extra})' if extra else ''}")
    for key, value in ours.items():
        if isinstance(value, list) and (not isinstance(saved[key], list) or len(saved[key]) != len(value)):
            raise CheckpointError(f"{file}: {key!r} is {saved[key]!r}, this run's scheduler has {len(value)} "
                                  "entries (one per parameter group)")
