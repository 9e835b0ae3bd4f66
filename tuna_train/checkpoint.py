"""Checkpoints written atomically, and exact resume.

A checkpoint directory ``checkpoints/step-000100/`` holds:

- ``trainable.safetensors``: every trainable parameter (all weights in full fine-tuning, the adapters
  with LoRA; the frozen base is rebuilt from its source on resume);
- ``optimizer.pt``, ``scheduler.pt``: state dicts of tensors and numbers, read back with
  ``torch.load(weights_only=True)``, which refuses any other pickled object (no code runs on resume);
- ``rng-<rank>.json``: the Python, NumPy, torch and CUDA generator states as JSON lists of integers;
- ``state.json``: the step, the data position, counters and the best evaluation so far.

``checkpoints/latest`` names the newest checkpoint; it must be a plain ``step-NNNNNNN`` name inside
``checkpoints/`` (an absolute path or ``..`` is refused).

It is written to ``.tmp-step-000100`` with every file fsynced, then renamed into place, and only then
does ``checkpoints/latest`` (itself replaced by rename) point at it: a run killed at any moment leaves
either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .files import fsync_dir, fsync_file, write_atomic

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read (named in the message)."""


_LATEST_NAME = re.compile(r"step-\d+")


def rng_state() -> Dict[str, Any]:
    """Every generator's state as JSON-able lists of ints (no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_tensors(path: Path) -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True``: tensors, numbers, strings and
    containers only. A file holding any other pickled object is refused before it can run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: refused: not a plain tensor file ({first}); checkpoints hold only "
                              "tensors, safetensors and JSON. Delete this checkpoint or pass --overwrite") from None


def trainable_state(model) -> Dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu").contiguous() for name, param in model.named_parameters()
            if param.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: Dict[str, Any],
                    rank: int = 0, world_size: int = 1, barrier=None, keep: int = 2,
                    weights: Optional[Dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints``; every process calls it (each saves its RNG).

    ``weights`` and ``optimizer_state``, when given, are written instead of ``model``'s trainable parameters
    and ``optimizer.state_dict()`` (a sharded run passes the gathered ones)."""
    checkpoints = root / "checkpoints"
    final = checkpoints / f"step-{step:07d}"
    tmp = checkpoints / f".tmp-step-{step:07d}"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if barrier:
        barrier()
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_state()))
    fsync_file(tmp / f"rng-{rank}.json")
    if barrier:
        barrier()
    if rank == 0:
        save_file(trainable_state(model) if weights is None else weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, world_size=world_size), indent=1))
        for file in tmp.iterdir():
            fsync_file(file)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints)
        write_atomic(checkpoints / LATEST, final.name)
        _prune(checkpoints, keep)
    if barrier:
        barrier()
    return final


def _prune(checkpoints: Path, keep: int) -> None:
    done = sorted(p for p in checkpoints.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(root: Path, resume: str) -> Optional[Path]:
    """The checkpoint to resume from: ``auto`` = the latest complete one under root (None if none),
    ``never`` = None, otherwise the given directory (which must exist)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no state.json)")
        return path
    latest = root / "checkpoints" / LATEST
    if not latest.exists():
        return None
    name = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not _LATEST_NAME.fullmatch(name):
        raise CheckpointError(f"{latest}: names {name!r}, which is not a checkpoint directory name (step-NNNNNNN) "
                              "inside checkpoints/; refusing to follow it")
    path = root / "checkpoints" / name
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{latest}: names {name}, but {path} is not a complete checkpoint (no state.json)")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, restore=None) -> Dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved state.

    ``restore(weights, optimizer_state)``, when given, loads the weights and optimizer state instead of the
    plain copy (a sharded run shards them again)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / 'state.json'}: not valid JSON ({error})") from None
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable parameters {missing[:3]}: was it written "
                         "with another model or LoRA setting?")
    if restore is not None:
        restore(weights, load_tensors(path / "optimizer.pt"))
    else:
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device))
        optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    rng_file = path / f"rng-{rank}.json"
    if rng_file.exists():
        try:
            set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{rng_file}: not a generator state ({type(error).__name__}: {error})") from None
    elif (path / f"rng-{rank}.pt").exists():  # written before RNG states were JSON: refused, not unpickled
        raise CheckpointError(f"{path / f'rng-{rank}.pt'}: a pickled RNG state from an older version; it is not "
                              "loaded (pickle can run code). Start afresh with --overwrite")
    return state
