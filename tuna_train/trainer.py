"""The training loop: accelerate-based, so one code path serves CPU, one GPU and several (DDP, FSDP).

Its parts live apart: what a run is built from (build.py), which groups each step takes (sampler.py), what
one optimizer step does (step.py) and what the run carries between steps and checkpoints (run_state.py);
:class:`Trainer` wires them and runs the loop: resume, evaluation, logging, checkpoints, signals.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from tuna_hf.head import base_model, lm_head_spec
from tuna_hf.model import FusedCausalLM

from .build import (build_model, build_optimizer, build_reference_model, build_scheduler, check_ref_scores,
                    load_datasets, release_single_process_state, warmup_steps)
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .collate import TokenizedGroup, pack, pad_id_of, split_by_tokens, tokenize_group
from .config import TrainConfig
from .controls import prompt_free_accuracy, shuffled_prompts
from .data import RankedExample
from .files import write_atomic
from .metrics import COUNT_KEYS, MetricsLog, batch_counts, summarise
from .progress import progress_bar
from .run_dir import claim_output_dir
from .run_state import RunState
from .sampler import GroupSampler
from .sharding import (
    check_launch,
    check_sharding,
    gathered_state,
    local_fraction,
    register_for_zero3,
    restore_training_state,
    shard_fsdp,
    training_state,
)
from .step import OptimizerStep

logger = logging.getLogger(__name__)

#: called after every optimizer step with the step number (1-based) and the step's metrics
StepCallback = Callable[[int, Dict[str, float]], None]


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`; :meth:`run` returns the summary.

    ``callbacks`` (functions of the step number and the step's metrics) run after every optimizer step, e.g.
    to log elsewhere or to :meth:`request_stop`; :meth:`train_step` runs one step outside the loop.
    """

    def __init__(self, config: TrainConfig, model=None, tokenizer=None) -> None:
        """``model`` and ``tokenizer`` (both or neither): train this causal LM (e.g. one built or wrapped in your
        own code) instead of the one ``config`` describes; the rest of the config applies as it is."""
        if (model is None) != (tokenizer is None):
            raise ValueError("Trainer takes a model and its tokenizer together (or neither: built from the config)")
        self.config = config.validate()
        check_sharding(config)
        trackers = (["tensorboard"] if config.tensorboard else []) + \
            [name.strip() for name in config.trackers.split(",") if name.strip()]
        release_single_process_state(config.mixed_precision)
        self.accelerator = Accelerator(cpu=config.cpu or not torch.cuda.is_available(),
                                       mixed_precision=config.mixed_precision, log_with=trackers or None,
                                       project_dir=str(Path(config.output_dir) / "tensorboard"))
        check_launch(config, self.accelerator.distributed_type.value)
        set_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        self.is_main = self.accelerator.is_main_process
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.run_lock = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # one run per directory, and no silent resume with other settings (run_dir.py): checked first
            self.run_lock = claim_output_dir(self.output_dir, config)
        self.accelerator.wait_for_everyone()

        self.data = load_datasets(config)
        if config.reference == "field":
            check_ref_scores(self.data.train)
        self.sampler = GroupSampler(len(self.data.train), config.batch_groups, config.grad_accum, self.world_size,
                                    self.rank, config.seed)
        self.total_steps = self.sampler.total_steps(config.max_steps, config.num_epochs)
        self.warmup_steps = warmup_steps(config, self.total_steps)  # a warm-up as long as the run: warned now
        self.model, self.tokenizer = build_model(config) if model is None else (model, tokenizer)
        lm_head_spec(self.model)  # an lm_head the fused loss cannot reproduce is refused before any step
        self.pad_id = pad_id_of(self.tokenizer)
        self.loss_fn = config.tuna_loss()
        # reference model:PATH: frozen, held by the fused module but not one of its parameters (so not in the
        # optimizer, the DDP / FSDP wrapper or the checkpoints)
        self.reference_model = build_reference_model(config, self.accelerator.device, self.tokenizer)
        # the causal LM and the fused loss in one module: the one DDP / FSDP / ZeRO-3 wraps
        fused = FusedCausalLM(self.model, self.loss_fn, reference=config.reference,
                              reference_model=self.reference_model, impl=config.impl,
                              autotune=config.autotune)
        self.sharded = config.sharding == "fsdp"
        if self.sharded:  # shard first: the optimizer holds the shards
            fused = shard_fsdp(fused, config.fsdp_cpu_offload)
        elif config.sharding == "deepspeed_zero3":
            register_for_zero3(fused)
        params = [p for p in fused.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, params)
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps, self.warmup_steps)
        if self.sharded:
            self.wrapped = fused
        else:
            self.wrapped, self.optimizer = self.accelerator.prepare(fused, self.optimizer)
        self.optimizer_step = OptimizerStep(self.accelerator, self.wrapped, self.optimizer, self.scheduler, config,
                                            self.sharded, self.output_dir)
        if trackers:  # the run's settings go with its metrics (scalars only: trackers take no None)
            self.accelerator.init_trackers("tuna", config={key: value for key, value in config.to_dict().items()
                                                           if isinstance(value, (bool, int, float, str))})
        self.log = MetricsLog(self.output_dir, self.accelerator if trackers else None, enabled=self.is_main)
        self.state = RunState()
        self.callbacks: List[StepCallback] = []
        self.stop_requested = False
        self.prompt_free = None
        self.truncation_warned = False

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def global_groups(self) -> int:
        """Groups per optimizer step, over every process and micro-batch."""
        return self.sampler.global_groups

    # ----------------------------------------------------------------- data
    def groups_for(self, step: int, micro: int) -> List[RankedExample]:
        """The groups of this process's micro-batch ``micro`` of optimizer step ``step``."""
        return [self.data.train[i] for i in self.sampler.indices(step, micro)]

    def make_batch(self, examples: Sequence[RankedExample]):
        return self._pack(self._tokenize(examples))

    def _tokenize(self, examples: Sequence[RankedExample]) -> List[TokenizedGroup]:
        return [tokenize_group(e, self.tokenizer, self.config.template, self.config.max_length,
                               self.config.max_candidates) for e in examples]

    def _pack(self, groups: Sequence[TokenizedGroup]):
        return pack(groups, self.config.packing, self.pad_id).to(self.accelerator.device)

    def pieces(self, examples: Sequence[RankedExample]) -> List[List[TokenizedGroup]]:
        """The tokenised groups of ``examples`` in pieces of at most ``max_batch_tokens`` padded tokens each."""
        return split_by_tokens(self._tokenize(examples), self.config.packing, self.config.max_batch_tokens)

    # ----------------------------------------------------------- evaluation
    def evaluate_with_controls(self) -> Dict[str, float]:
        """:meth:`evaluate`, plus the controls (``eval_controls``): the pairwise accuracy with every group
        under another held-out group's prompt, and that of a scorer that never sees the prompt."""
        result = self.evaluate()
        if self.config.eval_controls:
            held_out = self.data.eval[:self.config.eval_groups]
            shuffled = shuffled_prompts(held_out)
            result["shuffled_pair_accuracy"] = self.evaluate(shuffled)["pair_accuracy"] if shuffled else float("nan")
            if self.prompt_free is None:  # the same before and after training: computed once
                self.prompt_free = prompt_free_accuracy(self.data.train, held_out)["pair_accuracy"]
            result["prompt_free_pair_accuracy"] = self.prompt_free
        return result

    @torch.no_grad()
    def evaluate(self, examples: Optional[Sequence[RankedExample]] = None) -> Dict[str, float]:
        """Held-out pairwise ranking accuracy, best-vs-worst score gap and MLE loss (sharded over processes)."""
        examples = self.data.eval[:self.config.eval_groups] if examples is None else examples
        totals = dict.fromkeys(COUNT_KEYS, 0.0)
        was_training = self.wrapped.training
        self.wrapped.eval()
        # FSDP's forward is collective: every process must run as many batches, so each scores all examples
        mine = examples if self.sharded else examples[self.rank::self.world_size]
        for start in range(0, len(mine), self.config.batch_groups):
            chunk = mine[start:start + self.config.batch_groups]
            # the token budget's pieces only when not sharded: under FSDP every process runs as many forwards
            for groups in ([self._tokenize(chunk)] if self.sharded else self.pieces(chunk)):
                batch = self._pack(groups)
                with self.accelerator.autocast():  # the dtype path of training: the fused pass follows autocast
                    sums, counts = self.wrapped(batch, scores_only=True)
                scores = batch.layout.to_matrix(self.loss_fn.sequence_scores(sums, counts))
                for key, value in batch_counts(scores, batch.layout.valid(), batch.layout.target_scores,
                                               sums, counts).items():
                    totals[key] += value
        if self.world_size > 1 and not self.sharded:
            vector = torch.tensor([totals[k] for k in COUNT_KEYS], dtype=torch.float64, device=self.accelerator.device)
            vector = self.accelerator.reduce(vector, reduction="sum")
            totals = dict(zip(COUNT_KEYS, vector.tolist()))
        if was_training:
            self.wrapped.train()
        return summarise(totals)

    def _eval_and_track(self, step: int) -> Dict[str, float]:
        result = self.evaluate_with_controls()
        self.log.log(step, "eval", result)
        self.state.track_eval(step, result)
        return result

    # ------------------------------------------------------------------ loop
    def request_stop(self) -> None:
        """Save a checkpoint at the end of the current step and stop (what SIGTERM and SIGINT do)."""
        self.stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        logger.warning("signal %s: saving a checkpoint at the end of this step, then stopping", signum)
        self.request_stop()

    def train_step(self, step: int) -> Dict[str, float]:
        """Optimizer step ``step`` (0-based) on this process's micro-batches of it; returns its metrics."""
        config = self.config
        if not config.max_batch_tokens or self.sharded:  # FSDP's forwards are collective: no uneven pieces
            batches = (self.make_batch(self.groups_for(step, micro)) for micro in range(config.grad_accum))
            metrics = self.optimizer_step(step, batches, self.state)
        else:  # each micro-batch in pieces within the token budget, weighted by their share of its groups
            pieces, weights = [], []
            for micro in range(config.grad_accum):
                split = self.pieces(self.groups_for(step, micro))
                total = sum(map(len, split))
                pieces += split
                weights += [len(piece) / total / config.grad_accum for piece in split]
            metrics = self.optimizer_step(step, (self._pack(piece) for piece in pieces), self.state,
                                          weights if len(pieces) > config.grad_accum else None)
        self._warn_truncation()
        return metrics

    def _save(self, step: int) -> None:
        gathered = training_state(self.wrapped, self.optimizer) if self.sharded else (None, None)
        # the metrics rows written so far go with it: a resume drops those logged after it
        save_checkpoint(self.output_dir, step, self.model, self.optimizer, self.scheduler,
                        dict(self.state.to_dict(), metrics_rows=self.log.rows), settings=self.config.to_dict(),
                        weights=gathered[0], optimizer_state=gathered[1],
                        rank=self.rank, world_size=self.world_size,
                        barrier=self.accelerator.wait_for_everyone if self.world_size > 1 else None,
                        keep=self.config.keep_checkpoints)

    def _resume(self) -> Optional[int]:
        """Restores the checkpoint ``config.resume`` names, if any; returns its step."""
        checkpoint = find_checkpoint(self.output_dir, self.config.resume)
        if checkpoint is None:
            return None
        restore = functools.partial(restore_training_state, self.wrapped, self.optimizer) if self.sharded else None
        saved = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.rank, restore=restore)
        step = saved.pop("step")
        world_size = saved.pop("world_size", 1)
        metrics_rows = saved.pop("metrics_rows", None)
        if world_size != self.world_size:
            raise ValueError(f"checkpoint {checkpoint} was written by {world_size} processes, "
                             f"this run has {self.world_size}: exact resume needs the same world size")
        self.state = RunState.from_dict(saved, source=str(checkpoint / "state.json"))
        if metrics_rows is None:  # a checkpoint from an older version
            self.log.truncate_after(step)
        else:
            self.log.keep_rows(metrics_rows)
        logger.info("resumed from %s at step %d", checkpoint, step)
        return step

    def run(self) -> Dict:
        """Train to the end (or to a stop request) and return the summary. The directory's lock is released
        however the run ends: after an error (a refused checkpoint, a full disk) the same process can run again."""
        try:
            return self._run()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _run(self) -> Dict:
        config = self.config
        resumed_from = self._resume()
        start_step = resumed_from or 0
        if self.is_main:
            logger.info("%s", self.describe(start_step))
        if self.state.initial_eval is None and self.data.eval:
            if self.is_main:
                logger.info("evaluating %d held-out groups before training",
                            min(len(self.data.eval), config.eval_groups))
            self.state.initial_eval = self.evaluate_with_controls()
            self.log.log(0, "eval", self.state.initial_eval)

        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        progress = None
        if config.progress and self.is_main:
            progress = progress_bar(self.total_steps, "tuna train", unit="step", initial=start_step)
        started = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        final_step = start_step
        self.wrapped.train()
        try:
            for step in range(start_step, self.total_steps):
                step_metrics = self.train_step(step)
                final_step = step + 1
                window_tokens += step_metrics.pop("tokens_in_step")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                                         tok_s=f"{window_tokens / max(1e-9, time.perf_counter() - window_start):.0f}",
                                         cut=f"{self.state.prompts_truncated}p/{self.state.responses_truncated}r")
                if final_step % config.log_every == 0 or final_step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    step_metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                    self.log.log(final_step, "train", step_metrics)
                    window_tokens, window_start = 0, time.perf_counter()
                for callback in self.callbacks:
                    callback(final_step, step_metrics)
                if (config.eval_every and final_step % config.eval_every == 0 and final_step != self.total_steps
                        and self.data.eval):  # eval_fraction 0 and no eval_data: nothing held out
                    self._eval_and_track(final_step)
                if final_step % config.save_every == 0 or self.stop_requested:
                    self._save(final_step)
                if self.stop_requested:
                    break
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if progress is not None:
                progress.close()

        interrupted = final_step < self.total_steps
        summary = {"status": "interrupted" if interrupted else "finished", "steps": final_step,
                   "total_steps": self.total_steps, "train_seconds": time.perf_counter() - started,
                   "world_size": self.world_size, "sharding": config.sharding,
                   "local_param_fraction": local_fraction(self.wrapped), "train_groups": len(self.data.train),
                   "eval_groups": min(len(self.data.eval), config.eval_groups), "skipped_records": self.data.skipped,
                   "resumed_from_step": resumed_from, "steps_this_run": final_step - start_step,
                   # a stop asked for during the last step: the run finished, and whoever runs it stops next
                   "stop_requested": self.stop_requested}
        if not interrupted:
            # the last checkpoint comes before the final evaluation: a run killed after it (while final/ is
            # written) resumes at the end, drops that evaluation's row (metrics_rows) and logs it once again
            if final_step % config.save_every != 0:
                self._save(final_step)
            final_eval = self._eval_and_track(final_step) if self.data.eval else None
            self._save_final_model()
            summary["final_eval"] = final_eval
        state = self.state
        summary.update(initial_eval=state.initial_eval, best_eval=state.best_eval,
                       skipped_nonfinite=state.skipped_nonfinite, tokens=state.tokens, targets=state.targets,
                       tokens_saved=state.tokens_saved)
        summary["truncation"] = dict(state.truncation(), max_length=config.max_length)
        if self.is_main:
            write_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=1))
        self.log.close()
        self.accelerator.wait_for_everyone()
        return summary

    def describe(self, start_step: int = 0) -> str:
        """What this run is, printed before it starts: model, parameters, data, steps, batch, precision."""
        params = list(self.model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        config = self.config
        return (f"tuna train: {type(base_model(self.model)).__name__} with {total / 1e6:.2f}M parameters "
                f"({trainable / 1e6:.2f}M trainable{', LoRA' if config.lora else ''}"
                f"{', 4-bit base' if config.load_in_4bit else ''}) on {self.accelerator.device} x {self.world_size}"
                f"{f', sharding {config.sharding}' if config.sharding != 'none' else ''}, mixed precision "
                f"{config.mixed_precision}; {len(self.data.train)} training groups, {len(self.data.eval)} held out; "
                f"{self.total_steps} steps ({self.steps_per_epoch} per epoch) of {self.global_groups} groups"
                f"{f', resuming at step {start_step}' if start_step else ''}; output in {self.output_dir}")

    def _warn_truncation(self) -> None:
        """One warning per run when the share of truncated training groups passes ``truncation_warning``."""
        summary = self.state.truncation()
        if self.truncation_warned or summary["truncated_fraction"] <= self.config.truncation_warning:
            return
        self.truncation_warned = True
        logger.warning("max_length %d cut %.1f%% of the training groups so far (%d prompts cut on the left, %d "
                       "responses cut on the right, in %d groups): raise --max-length or shorten the data",
                       self.config.max_length, 100 * summary["truncated_fraction"], summary["prompts_truncated"],
                       summary["responses_truncated"], summary["groups_seen"])

    def _save_final_model(self) -> None:
        """The model (or adapter) whole in ``final/``, loadable with ``from_pretrained``; a sharded model is
        gathered first (every process takes part, the main process writes)."""
        state = None
        if self.sharded:
            prefix = "causal_lm."
            state = {name[len(prefix):]: tensor for name, tensor in
                     gathered_state(self.wrapped, trainable_only=False).items()}
        if not self.is_main:
            return
        final = self.output_dir / "final"
        unwrapped = self.accelerator.unwrap_model(self.wrapped).causal_lm
        unwrapped.save_pretrained(str(final), safe_serialization=True, state_dict=state)
        self.tokenizer.save_pretrained(str(final))
