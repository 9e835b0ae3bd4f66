"""Checkpoints written atomically, and exact resume.

A checkpoint directory ``checkpoints/step-000100/`` holds:

- ``trainable.safetensors``: every trainable parameter (all weights in full fine-tuning, the adapters
  with LoRA; the frozen base is rebuilt from its source on resume);
- ``optimizer.pt``, ``scheduler.pt``; ``rng-<rank>.pt`` (Python, NumPy, torch and CUDA generators);
- ``state.json``: the step, the data position, counters and the best evaluation so far.

It is written to ``.tmp-step-000100`` with every file fsynced, then renamed into place, and only then
does ``checkpoints/latest`` (itself replaced by rename) point at it: a run killed at any moment leaves
either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

LATEST = "latest"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by writing a temporary file, fsyncing it, and renaming it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> Dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu").contiguous() for name, param in model.named_parameters()
            if param.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: Dict[str, Any],
                    rank: int = 0, world_size: int = 1, barrier=None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints``; every process calls it (each saves its RNG)."""
    from safetensors.torch import save_file

    checkpoints = root / "checkpoints"
    final = checkpoints / f"step-{step:07d}"
    tmp = checkpoints / f".tmp-step-{step:07d}"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if barrier:
        barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    _fsync_file(tmp / f"rng-{rank}.pt")
    if barrier:
        barrier()
    if rank == 0:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, world_size=world_size), indent=1))
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoints)
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
    path = root / "checkpoints" / latest.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> Dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved state."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable parameters {missing[:3]}: was it written "
                         "with another model or LoRA setting?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
