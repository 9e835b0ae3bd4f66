"""Checkpoints that cannot be trusted, and disks that fill up (issue 27, points 5-8).

A checkpoint is checked against its manifest and against the run resuming it before anything is loaded: a
tensor of another shape or dtype, a file cut short, a state of another kind is refused in one line naming the
file and what is wrong (never broadcast, cast, or reported as a library's KeyError). A checkpoint carries the
settings it was written with, so a copy resumes only with them. A full disk is one line naming the path and
ENOSPC; the partial checkpoint is removed, and a resume removes a killed run's before it writes anything.
"""

import errno
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_runs import cli_flags, latest_weights, metrics, restamp, run
from tuna_train import files
from tuna_train import run_dir as run_dir_module
from tuna_train.checkpoint import CheckpointError
from tuna_train.cli import main
from tuna_train.run_dir import RunDirectoryError

STEP2 = Path("checkpoints") / "step-0000002"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 4 steps stopped (and checkpointed) after 2; tests change copies of it."""
    root = tmp_path_factory.mktemp("stopped") / "run"
    assert run(root, stop_after=2, max_steps=4)["steps"] == 2
    return root


@pytest.fixture
def copied(stopped_run, tmp_path):
    """A copy of the stopped run and its checkpoint."""
    root = tmp_path / "run"
    shutil.copytree(stopped_run, root)
    return root, root / STEP2


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def rewrite_weights(checkpoint, change):
    """Apply ``change`` to the checkpoint's weights (a dict of name -> tensor) and write them back."""
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    change(weights)
    save_file(weights, str(checkpoint / "trainable.safetensors"))


# ------------------------------------------------------------------ 27.5: tensors against model and manifest
HEAD = "lm_head.weight"  # [384, 32] in the TINY model
REPLACEMENTS = {"row": torch.zeros(1, 32), "scalar": torch.tensor(0.5), "float16": torch.zeros(384, 32).half()}


@pytest.mark.parametrize("manifest", ["rewritten", "stale", "absent"])
@pytest.mark.parametrize("replacement", sorted(REPLACEMENTS))
def test_a_tensor_of_another_shape_or_dtype_is_refused(copied, replacement, manifest):
    """Copied into a [384, 32] parameter, a [1, 32] or scalar one would broadcast and a float16 one be cast, and
    the run would finish with rc 0. Refused whether the manifest was rewritten to match (a checkpoint of
    another model: the model check), left as written (the manifest check), or is absent (an older checkpoint)."""
    root, checkpoint = copied
    new = REPLACEMENTS[replacement]
    rewrite_weights(checkpoint, lambda weights: weights.__setitem__(HEAD, new))
    if manifest == "rewritten":
        restamp(checkpoint, {HEAD: (new.shape, str(new.dtype).removeprefix("torch."))})
    elif manifest == "absent":
        (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as refused:
        run(root, max_steps=4)
    message = one_line(refused)
    against = "its manifest" if manifest == "stale" else "the model"
    assert message.startswith(f"{checkpoint / 'trainable.safetensors'}: tensor {HEAD} has ")
    assert against in message
    key, found, expected = ("dtype", "float16", "float32") if replacement == "float16" else \
        ("shape", str(list(new.shape)), "[384, 32]")
    assert f"{key} {found}, {against}" in message and message.count(expected) >= 1
    assert load_file(str(checkpoint / "trainable.safetensors"))[HEAD].shape == new.shape  # nothing overwritten


def test_the_cli_refuses_a_broadcastable_tensor_with_one_line_and_rc_2(copied, capsys):
    root, checkpoint = copied
    rewrite_weights(checkpoint, lambda weights: weights.__setitem__(HEAD, torch.zeros(1, 32)))
    restamp(checkpoint, {HEAD: ([1, 32], "float32")})
    assert main(["train", "--output-dir", str(root), *cli_flags(max_steps=4)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tuna train: error: ") and str(checkpoint / "trainable.safetensors") in error
    assert HEAD in error and "[1, 32]" in error
    assert json.loads((root / "summary.json").read_text())["status"] == "interrupted"  # the stopped run's stands


# --------------------------------------------------------------------------- 27.6: corrupt checkpoint files
def _cut(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[:keep(len(data))])


def _json(file, value):
    file.write_text(json.dumps(value))


def _edit_state(checkpoint, **fields):
    state = json.loads((checkpoint / "state.json").read_text())
    state.update(fields)
    _json(checkpoint / "state.json", state)


def _two_groups(checkpoint):
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    first = dict(saved["param_groups"][0])
    ids = first["params"]
    saved["param_groups"] = [dict(first, params=ids[:5]), dict(first, params=ids[5:])]
    torch.save(saved, checkpoint / "optimizer.pt")


def _moment_of_another_shape(checkpoint):
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"] = torch.zeros(1)
    torch.save(saved, checkpoint / "optimizer.pt")


def _scheduler_of_another_kind(checkpoint):
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 5)
    torch.save(other.state_dict(), checkpoint / "scheduler.pt")


def _extra_tensor(checkpoint):
    rewrite_weights(checkpoint, lambda weights: weights.__setitem__("extra.weight", torch.zeros(3)))
    return {"extra.weight": ([3], "float32")}


# kind -> (what is done to the checkpoint, whether the manifest is then rewritten to match, file named, message)
CORRUPTIONS = {
    "truncated_safetensors": (lambda c: _cut(c / "trainable.safetensors", lambda n: n // 2), True,
                              "trainable.safetensors", "not a readable safetensors file"),
    "empty_safetensors": (lambda c: _cut(c / "trainable.safetensors", lambda n: 0), True,
                          "trainable.safetensors", "not a readable safetensors file"),
    "extra_tensor": (_extra_tensor, True, "trainable.safetensors", "tensor extra.weight [3] is not in the model"),
    "missing_tensor": (lambda c: rewrite_weights(c, lambda w: w.pop(HEAD)), False, "trainable.safetensors",
                       f"tensor {HEAD} [384, 32] of its manifest"),
    "scheduler_of_another_kind": (_scheduler_of_another_kind, True, "scheduler.pt", "lacks ['lr_lambdas']"),
    "state_json_array": (lambda c: _json(c / "state.json", []), True, "state.json",
                         "expected a JSON object, found array"),
    "state_json_not_json": (lambda c: (c / "state.json").write_text("{\"step\": 2,"), True, "state.json",
                            "not valid JSON"),
    "state_field_of_another_type": (lambda c: _edit_state(c, groups_seen="8"), True, "state.json",
                                    "'groups_seen' must be a whole number >= 0, found '8'"),
    "negative_step": (lambda c: _edit_state(c, step=-5), True, "state.json",
                      "'step' must be a whole number >= 0, found -5"),
    "step_of_another_directory": (lambda c: _edit_state(c, step=3), True, "state.json",
                                  "'step' is 3, but the checkpoint directory is step-0000002"),
    "optimizer_groups_of_another_count": (_two_groups, True, "optimizer.pt",
                                          "2 parameter groups, this run's optimizer has 1"),
    "optimizer_moment_of_another_shape": (_moment_of_another_shape, True, "optimizer.pt",
                                          "exp_avg of parameter 0 (group 0) has shape [1]"),
    "truncated_optimizer": (lambda c: _cut(c / "optimizer.pt", lambda n: n - 100), False, "optimizer.pt",
                            "manifest.json says"),
    "truncated_optimizer_unlisted": (lambda c: _cut(c / "optimizer.pt", lambda n: n - 100), True, "optimizer.pt",
                                     "refused: not a plain tensor file"),
    "missing_rng": (lambda c: (c / "rng-0.json").unlink(), True, "rng-0.json",
                    "missing: process 0's generator state"),
    "missing_rng_listed": (lambda c: (c / "rng-0.json").unlink(), False, "rng-0.json", "missing (listed in"),
    "rng_of_another_shape": (lambda c: _json(c / "rng-0.json", {"python": [1]}), True, "rng-0.json",
                             "not a generator state"),
    "manifest_not_json": (lambda c: (c / "manifest.json").write_text("{\"files\""), False, "manifest.json",
                          "not valid JSON"),
    "manifest_array": (lambda c: _json(c / "manifest.json", []), False, "manifest.json",
                       "expected a JSON object, found array"),
    "manifest_tensors_array": (lambda c: _json(c / "manifest.json", {"format": 1, "files": {}, "tensors": []}),
                               False, "manifest.json", "'tensors' must map"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_refused_naming_its_file(copied, kind):
    """Each corruption is one line naming the file and what is wrong (before: SafetensorError, KeyError
    'lr_lambdas', TypeError, a ValueError naming nothing, or accepted: step -5, no RNG state)."""
    root, checkpoint = copied
    corrupt, rewrite_manifest, name, what = CORRUPTIONS[kind]
    tensors = corrupt(checkpoint)  # the specs of the tensors it added, if any
    if rewrite_manifest and (checkpoint / "manifest.json").exists():
        restamp(checkpoint, tensors if isinstance(tensors, dict) else None)
    kept = sorted(p.name for p in checkpoint.iterdir())
    with pytest.raises(ValueError, match=f"^{re.escape(str(checkpoint / name))}: .*{re.escape(what)}") as refused:
        run(root, max_steps=4)
    one_line(refused)
    assert sorted(p.name for p in checkpoint.iterdir()) == kept  # the checkpoint is left as it was, to inspect


# -------------------------------------------------------------- 27.7: a checkpoint carries its own settings
def test_a_copied_checkpoint_resumes_only_with_the_settings_it_was_written_with(stopped_run, tmp_path):
    """--resume DIR/step-NNNNNNN copied away from its run directory: checked against the checkpoint's own
    config.json (before: nothing to compare with, so another learning rate and loss resumed silently)."""
    elsewhere = tmp_path / "copies" / "step-0000002"
    shutil.copytree(stopped_run / STEP2, elsewhere)
    assert not (elsewhere.parent.parent / "config.json").exists()
    with pytest.raises(RunDirectoryError) as refused:
        run(tmp_path / "new", max_steps=4, resume=str(elsewhere), learning_rate=1e-3, loss="listmle")
    message = one_line(refused)
    assert str(elsewhere) in message and "learning_rate: 0.003 -> 0.001" in message and "loss: " in message
    assert not (tmp_path / "new" / "checkpoints").exists()  # refused before anything ran

    told = run(tmp_path / "told", max_steps=4, resume=str(elsewhere), learning_rate=1e-3,
               resume_with_new_settings=True)
    assert told["resumed_from_step"] == 2 and told["steps_this_run"] == 2
    same = run(tmp_path / "same", max_steps=4, resume=str(elsewhere))
    assert same["resumed_from_step"] == 2 and same["status"] == "finished"
    straight = run(tmp_path / "straight", max_steps=4)
    assert metrics(tmp_path / "same")[-2:] == metrics(tmp_path / "straight")[-2:]  # steps 3 and 4, exactly


def test_a_checkpoint_records_the_settings_it_was_written_with(stopped_run):
    saved = json.loads((stopped_run / STEP2 / "config.json").read_text())
    assert saved == json.loads((stopped_run / "config.json").read_text())
    manifest = json.loads((stopped_run / STEP2 / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in (stopped_run / STEP2).iterdir()} - {"manifest.json"}
    weights = load_file(str(stopped_run / STEP2 / "trainable.safetensors"))
    assert manifest["tensors"] == {name: {"shape": list(t.shape), "dtype": "float32"} for name, t in weights.items()}


# ------------------------------------------------------------------------------------ 27.8: a full disk
class FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left, as the kernel writes it: a write past the room writes what fits,
    the next raises ENOSPC. Opened buffered, as ``open`` does, so the error surfaces where it would for real
    (torch.save then reports it as 'unexpected pos ...', without the errno)."""

    def __init__(self, path, room):
        super().__init__()
        self.file, self.room = io.FileIO(path, "w"), room

    def writable(self):
        return True

    def write(self, data):
        if self.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self.file.write(bytes(data[:self.room]))
        self.room -= written
        return written

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


@pytest.mark.parametrize("target", ["optimizer.pt", "scheduler.pt", "state.json", "manifest.json", "rng-0.json",
                                    ".latest.tmp"])
def test_a_full_disk_is_one_line_naming_enospc_and_the_path_and_the_run_resumes(stopped_run, tmp_path,
                                                                               monkeypatch, capsys, target):
    """The disk fills while step 4's checkpoint is written (torch.save alone would say 'unexpected pos ...'):
    one line with the path and ENOSPC, rc 2, the temporary directory removed, `latest` still at step 2; once
    there is room the run resumes from step 2 and ends where an uninterrupted run ends."""
    root = tmp_path / "run"
    shutil.copytree(stopped_run, root)
    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if Path(path).name == target and "w" in mode:
            return io.BufferedWriter(FullDisk(path, 4))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_on_a_full_disk, raising=False)
    assert main(["train", "--output-dir", str(root), *cli_flags(max_steps=4)]) == 2
    monkeypatch.undo()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    # write_atomic names the file it replaces, not its temporary one
    failed = root / "checkpoints" / ("latest" if target == ".latest.tmp" else f".tmp-step-0000004/{target}")
    assert error.startswith(f"tuna train: error: {failed}: cannot write: No space left on device (ENOSPC)"), error
    assert not list((root / "checkpoints").glob(".tmp*")) and not list((root / "checkpoints").glob(".*.tmp"))
    if target == ".latest.tmp":  # the checkpoint was complete: only the pointer to it failed
        assert (root / "checkpoints" / "step-0000004" / "manifest.json").exists()
        assert "step-0000004 is complete, but latest still names the checkpoint before it" in error
    else:
        assert not (root / "checkpoints" / "step-0000004").exists() and "step 4 not written" in error
    assert (root / "checkpoints" / "latest").read_text() == "step-0000002"

    resumed = run(root, max_steps=4)
    assert resumed["resumed_from_step"] == 2 and resumed["status"] == "finished"
    straight = run(tmp_path / "straight", max_steps=4)
    assert metrics(root) == metrics(tmp_path / "straight")  # one row per step, as if never interrupted
    expected = latest_weights(tmp_path / "straight")
    assert all(torch.equal(tensor, expected[name]) for name, tensor in latest_weights(root).items())
    assert resumed["final_eval"] == straight["final_eval"]


def test_a_resume_removes_a_killed_runs_partial_files_before_it_writes_anything(copied, monkeypatch):
    """A run killed while writing leaves .tmp-step-NNNNNNN (and write_atomic's temporary files): on a full disk
    they hold the space the resume needs for its first write, config.json (before: an ENOSPC traceback)."""
    root, _ = copied
    stale = [root / "checkpoints" / ".tmp-step-0000004", root / "checkpoints" / ".latest.tmp",
             root / ".config.json.tmp"]
    stale[0].mkdir()
    (stale[0] / "optimizer.pt").write_bytes(b"\0" * 4096)
    stale[1].write_text("step-00")
    stale[2].write_text("{")
    seen = []
    real_write = run_dir_module.write_atomic

    def write_atomic(path, text):
        seen.append([str(p) for p in stale if p.exists()])
        real_write(path, text)

    monkeypatch.setattr(run_dir_module, "write_atomic", write_atomic)
    assert run(root, max_steps=4)["resumed_from_step"] == 2
    assert seen == [[]]  # config.json, the resume's first write, found them gone
    assert not any(p.exists() for p in stale)


# -------------------------------------------------------- the same on a real full disk (a small tmpfs, as root)
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs mount rights: root in a container that allows it; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode(errors='replace').strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path, leave):
    """Write zeros to ``path`` until ``leave`` bytes are free on its file system (or none)."""
    with open(path, "wb", buffering=0) as handle:  # unbuffered: nothing left to fail at close
        try:
            while shutil.disk_usage(path.parent).free > leave:
                handle.write(b"\0" * min(65536, max(4096, shutil.disk_usage(path.parent).free - leave)))
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_on_a_real_full_disk_the_space_comes_back_and_the_run_resumes(small_disk, capsys):
    root = small_disk / "run"
    assert run(root, stop_after=2, max_steps=4)["steps"] == 2
    fill(small_disk / "filler", leave=100_000)  # room for metrics rows, not for a checkpoint (~650 kB)
    free = shutil.disk_usage(small_disk).free
    assert main(["train", "--output-dir", str(root), *cli_flags(max_steps=4)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(ENOSPC)" in error and str(root / "checkpoints" / ".tmp-step-0000004") in error, error
    assert not list((root / "checkpoints").glob(".tmp*"))
    assert shutil.disk_usage(small_disk).free > free - 20_000  # the partial checkpoint's space is back

    (small_disk / "filler").unlink()  # room again, but a killed run's partial checkpoint takes all of it
    (root / "checkpoints" / ".tmp-step-0000004").mkdir()
    fill(root / "checkpoints" / ".tmp-step-0000004" / "optimizer.pt", leave=0)
    resumed = run(root, max_steps=4)
    assert resumed["resumed_from_step"] == 2 and resumed["status"] == "finished"
    assert [r["step"] for r in metrics(root)] == [1, 2, 3, 4]
