"""Checkpoints written atomically, and exact resume.

A checkpoint directory ``checkpoints/step-000100/`` holds:

- ``trainable.safetensors``: every trainable parameter (all weights in full fine-tuning, the adapters
  with LoRA; the frozen base is rebuilt from its source on resume);
- ``optimizer.pt``, ``scheduler.pt``: state dicts of tensors and numbers, read back with
  ``torch.load(weights_only=True)``, which refuses any other pickled object (no code runs on resume);
- ``rng-<rank>.json``: the Python, NumPy, torch and CUDA generator states as JSON lists of integers;
- ``state.json``: the step, the data position, counters, the best evaluation so far and the number of
  ``metrics.jsonl`` rows written when it was saved (a resume drops the later ones);
- ``config.json``: the settings the run had when it wrote the checkpoint (run_dir.py checks a resume against
  them, wherever the checkpoint was copied);
- ``manifest.json``: every file's size and every tensor's shape and dtype (checkpoint_check.py checks the
  checkpoint against it, and against the run, before loading anything).

``checkpoints/latest`` names the newest checkpoint; it must be a plain ``step-NNNNNNN`` name inside
``checkpoints/`` (an absolute path or ``..`` is refused).

It is written to ``.tmp-step-000100`` with every file fsynced, then renamed into place, and only then
does ``checkpoints/latest`` (itself replaced by rename) point at it: a run killed at any moment leaves
either the previous checkpoint or the new one, never a half-written one. A write that fails (a full disk)
removes the temporary directory and says so in one line naming the file and ``ENOSPC``; the temporary
directory of a killed run is removed before a resume writes anything (:func:`remove_partial_checkpoints`).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint_check import (
    MANIFEST,
    CheckpointError,
    check_files,
    check_optimizer_state,
    check_scheduler_state,
    check_state,
    check_tensors,
    manifest_of,
    model_specs,
    read_manifest,
)
from .files import (
    WriteFailed,
    atomic_tmp,
    error_code,
    fsync_dir,
    fsync_file,
    read_json,
    write_atomic,
    write_stream,
    writing,
)

LATEST = "latest"
#: the run's settings, in a checkpoint as in its run directory
SETTINGS = "config.json"

__all__ = ["CheckpointError", "LATEST", "SETTINGS", "find_checkpoint", "load_checkpoint", "load_tensors",
           "remove_partial_checkpoints", "save_checkpoint"]

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
    _require(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: refused: not a plain tensor file ({_first_line(error)}); checkpoints hold only "
                              "tensors, safetensors and JSON. Delete this checkpoint or pass --overwrite") from None


def trainable_state(model) -> Dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu").contiguous() for name, param in model.named_parameters()
            if param.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: Dict[str, Any],
                    rank: int = 0, world_size: int = 1, barrier=None, keep: int = 2,
                    weights: Optional[Dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[Dict[str, Any]] = None,
                    settings: Optional[Dict[str, Any]] = None) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints``; every process calls it (each saves its RNG).

    ``weights`` and ``optimizer_state``, when given, are written instead of ``model``'s trainable parameters
    and ``optimizer.state_dict()`` (a sharded run passes the gathered ones); ``settings`` (the run's config)
    go with the checkpoint as its ``config.json``, so that a copy of it resumes only with them too.

    A failed write (a full disk) removes the temporary directory and raises :class:`WriteFailed` naming the
    file and the errno; the previous checkpoint and ``latest`` are untouched."""
    checkpoints = root / "checkpoints"
    final = checkpoints / f"step-{step:07d}"
    tmp = checkpoints / f".tmp-step-{step:07d}"
    try:
        if rank == 0:
            checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        if barrier:
            barrier()
        _write_text(tmp / f"rng-{rank}.json", json.dumps(rng_state()))
        if barrier:
            barrier()
        if rank == 0:
            _write_files(tmp, step, world_size, state, settings, trainable_state(model) if weights is None else
                         weights, optimizer.state_dict() if optimizer_state is None else optimizer_state, scheduler)
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(checkpoints)
    except BaseException as error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        code = error_code(error) if isinstance(error, Exception) else None
        if code is None:
            raise
        raise WriteFailed(getattr(error, "filename", None) or tmp, code,
                          f"; checkpoint step {step} not written, {tmp} removed; make room and rerun: the run "
                          "resumes from its last complete checkpoint") from None
    if rank == 0:
        try:
            write_atomic(checkpoints / LATEST, final.name)
        except WriteFailed as failed:
            raise WriteFailed(failed.filename, failed.errno, f"; {final} is complete, but {LATEST} still names the "
                              "checkpoint before it, which a rerun resumes from") from None
        _prune(checkpoints, keep)
    if barrier:
        barrier()
    return final


def _write_files(tmp: Path, step: int, world_size: int, state: Dict[str, Any], settings: Optional[Dict[str, Any]],
                 weights: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any], scheduler) -> None:
    """The main process's files of a checkpoint, each fsynced; the manifest last (it lists the others)."""
    trainable = tmp / "trainable.safetensors"
    with writing(trainable):
        save_file(weights, str(trainable))
    fsync_file(trainable)
    # torch.save to a handle of ours: its failure is then known by its errno (write_stream)
    write_stream(tmp / "optimizer.pt", functools.partial(torch.save, optimizer_state))
    write_stream(tmp / "scheduler.pt", functools.partial(torch.save, scheduler.state_dict()))
    _write_text(tmp / "state.json", json.dumps(dict(state, step=step, world_size=world_size), indent=1))
    if settings is not None:
        _write_text(tmp / SETTINGS, json.dumps(settings, indent=1))
    _write_text(tmp / MANIFEST, json.dumps(manifest_of(tmp, weights), indent=1))


def _write_text(path: Path, text: str) -> None:
    write_stream(path, lambda handle: handle.write(text.encode("utf-8")))


def remove_partial_checkpoints(root: Path) -> List[str]:
    """Delete what a run killed while writing left under ``root`` (``.tmp-step-*`` directories, temporary files
    of :func:`write_atomic`), so a resume on a full disk gets that space back before it writes anything; return
    the paths removed. Only under the run's lock: a live run's temporary files would go too."""
    checkpoints = root / "checkpoints"
    stale = sorted(checkpoints.glob(".tmp-step-*")) + [atomic_tmp(checkpoints / LATEST)]
    stale += [atomic_tmp(root / name) for name in (SETTINGS, "metrics.jsonl", "summary.json")]
    removed = []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(str(path))
    return removed


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

    Every file is checked first (checkpoint_check.py): against the manifest, and the tensors, optimizer
    and scheduler states against this run's; anything else is refused naming the file, before a value is
    loaded. ``restore(weights, optimizer_state)``, when given, loads the weights and optimizer state instead of
    the plain copy (a sharded run shards them again)."""
    manifest = read_manifest(path)
    state = read_json(path / "state.json", dict, CheckpointError)
    check_state(path / "state.json", state)
    weights_file = path / "trainable.safetensors"
    weights = _load_weights(weights_file)
    if manifest is not None:
        check_tensors(weights_file, weights, manifest["tensors"], f"its manifest {path / MANIFEST}")
    check_tensors(weights_file, weights, model_specs(model), "the model")
    if manifest is not None:
        check_files(path, manifest)
    optimizer_state = load_tensors(path / "optimizer.pt")
    check_optimizer_state(path / "optimizer.pt", optimizer_state, optimizer)
    scheduler_state = load_tensors(path / "scheduler.pt")
    check_scheduler_state(path / "scheduler.pt", scheduler_state, scheduler)
    rng_file = path / f"rng-{rank}.json"
    if not rng_file.exists() and (path / f"rng-{rank}.pt").exists():  # written before RNG states were JSON
        raise CheckpointError(f"{path / f'rng-{rank}.pt'}: a pickled RNG state from an older version; it is not "
                              "loaded (pickle can run code). Start afresh with --overwrite")
    if not rng_file.exists():
        raise CheckpointError(f"{rng_file}: missing: process {rank}'s generator state is needed for an exact "
                              "resume (was the checkpoint written by fewer processes, or copied in part?)")
    rng = read_json(rng_file, dict, CheckpointError)

    with _loading(path / "optimizer.pt"):
        if restore is not None:
            restore(weights, optimizer_state)
        else:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor.to(params[name].device))
            optimizer.load_state_dict(optimizer_state)
    with _loading(path / "scheduler.pt"):
        scheduler.load_state_dict(scheduler_state)
    with _loading(rng_file, "not a generator state"):
        set_rng_state(rng)
    return state


def _require(file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")


def _load_weights(file: Path) -> Dict[str, torch.Tensor]:
    _require(file)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_line(error)}): cut short or "
                              "damaged") from None


@contextmanager
def _loading(file: Path, what: str = "does not fit this run") -> Iterator[None]:
    """A library's refusal of a state the checks let through, as one line naming ``file``."""
    try:
        yield
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{file}: {what} ({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
