"""The training loop: accelerate-based, so one code path serves CPU, one GPU and several (DDP).

One optimizer step consumes ``batch_groups x grad_accum x world_size`` groups. Which groups is a pure
function of the seed and the step (a seeded permutation per epoch), so resuming needs only the step
number: a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from tuna_hf.model import FusedCausalLM, base_model
from tuna_kernels import TunaLoss

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .collate import pack, tokenize_group
from .config import TrainConfig
from .controls import prompt_free_accuracy, shuffled_prompts
from .data import RankedExample, examples_from_records, load_ranked, select_examples
from .files import write_atomic
from .metrics import COUNT_KEYS, MetricsLog, batch_counts, summarise
from .model import adapter_base_path, add_lora, build_tiny_llama, load_model, load_tokenizer, synthetic_tokenizer
from .run_dir import claim_output_dir
from .sharding import (
    check_launch,
    check_sharding,
    clip_grad_norm,
    gathered_state,
    local_fraction,
    register_for_zero3,
    restore_training_state,
    shard_fsdp,
    training_state,
)
from .synthetic import make_records

logger = logging.getLogger(__name__)


TRUNCATION_KEYS = ("prompts_truncated", "responses_truncated", "groups_truncated", "groups_seen")


def truncation_summary(state: Dict) -> Dict[str, float]:
    """Cumulative truncation counts of the training groups seen, and the truncated share of them."""
    out = {key: int(state.get(key, 0)) for key in TRUNCATION_KEYS}
    out["truncated_fraction"] = out["groups_truncated"] / out["groups_seen"] if out["groups_seen"] else 0.0
    return out


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last checkpoint is intact."""


@dataclass
class Datasets:
    train: Sequence[RankedExample]
    eval: Sequence[RankedExample]
    skipped: int = 0


def load_datasets(config: TrainConfig) -> Datasets:
    """Training and held-out examples: the built-in synthetic tasks, or files."""
    skipped = 0
    if config.data is None:  # held-out instructions (words) are disjoint from training ones, by construction

        examples = examples_from_records(make_records(config.synthetic_examples, config.synthetic_seed),
                                         source="synthetic")
        if config.eval_data is None:
            num_eval = int(round(config.synthetic_examples * config.eval_fraction))
            held_out = make_records(num_eval, config.synthetic_seed + 1, split="heldout") if num_eval else []
            return Datasets(examples, examples_from_records(held_out, source="synthetic held-out"))
    else:
        examples, report = load_ranked(config.data, config.data_format, config.skip_bad_records,
                                       config.include_judge_response)
        skipped = report.skipped
        if report.skipped:
            logger.warning("%s: skipped %d bad records; first: %s", config.data, report.skipped, report.first_errors[0])
    if config.eval_data is not None:
        eval_examples, report = load_ranked(config.eval_data, config.data_format, config.skip_bad_records,
                                            config.include_judge_response)
        return Datasets(examples, eval_examples, skipped + report.skipped)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    num_eval = int(round(len(examples) * config.eval_fraction))
    return Datasets(select_examples(examples, order[num_eval:]), select_examples(examples, order[:num_eval]), skipped)


def build_model(config: TrainConfig):
    """(model, tokenizer) as configured: a local model (4-bit, LoRA) or the tiny Llama of the default.

    A ``config.model`` directory that holds a LoRA adapter (a Tuna_p trained with ``--lora``) is loaded on
    its base: with ``lora`` and ``adapter="attach"`` training continues that adapter; with
    ``adapter="merge"`` it is merged into the base first (and ``lora`` then trains a new adapter on top).
    """
    if config.model is None:
        tokenizer = synthetic_tokenizer()
        model = build_tiny_llama(vocab_size=len(tokenizer), hidden_size=config.tiny_hidden_size,
                                 num_layers=config.tiny_layers, num_heads=config.tiny_heads,
                                 intermediate_size=3 * config.tiny_hidden_size, seed=config.seed,
                                 attn_implementation=config.attn_implementation)
    else:
        is_adapter = adapter_base_path(config.model) is not None
        if is_adapter and not config.lora and config.adapter == "attach":
            raise ValueError(f"{config.model} is a LoRA adapter: train it further with --lora (adapter 'attach'), "
                             "or merge it into its base with --adapter merge (full fine-tuning of the merged model)")
        tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
        model = load_model(config.model, load_in_4bit=config.load_in_4bit, compute_dtype=config.bnb_compute_dtype,
                           double_quant=config.bnb_double_quant, torch_dtype=config.torch_dtype,
                           attn_implementation=config.attn_implementation, trust_remote_code=config.trust_remote_code,
                           adapter=config.adapter, trainable=True)
        if is_adapter and config.adapter == "attach":  # the adapter is trained as it is: no second one
            if config.gradient_checkpointing:
                model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            return model, tokenizer
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora:
            model.enable_input_require_grads()
    if config.lora:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                         quantized=config.load_in_4bit, gradient_checkpointing=config.gradient_checkpointing)
    return model, tokenizer


def build_optimizer(config: TrainConfig, params):
    if config.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                        weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer, total_steps: int):
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def release_single_process_state(mixed_precision: str) -> None:
    """Lets a second Trainer in the same single process use another mixed precision.

    accelerate keeps one process-wide AcceleratorState and refuses a new Accelerator whose mixed precision
    differs (a notebook that trains fp32 then bf16, or a test suite). Nothing outlives a Trainer in that state
    when there is one process, so it is cleared; a distributed launch keeps it (its processes agree on it).
    """
    shared = AcceleratorState._shared_state
    if shared and PartialState().num_processes == 1 and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`; :meth:`run` returns the summary."""

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
        self.model, self.tokenizer = build_model(config) if model is None else (model, tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.loss_fn = TunaLoss(loss=config.loss, margin=config.margin, alpha=config.alpha,
                                mle_weight=config.mle_weight, mle_on=config.mle_on, skip_ties=config.skip_ties,
                                beta=config.beta, gamma=config.gamma, impl=config.impl,
                                autotune=config.kernel_autotune or None)
        # the causal LM and the fused loss in one module: the one DDP / FSDP / ZeRO-3 wraps
        fused = FusedCausalLM(self.model, self.loss_fn, impl=config.impl, autotune=config.kernel_autotune or None)
        self.sharded = config.sharding == "fsdp"
        if self.sharded:  # shard first: the optimizer holds the shards
            fused = shard_fsdp(fused, config.fsdp_cpu_offload)
        elif config.sharding == "deepspeed_zero3":
            register_for_zero3(fused)
        params = [p for p in fused.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, params)
        self.global_groups = config.batch_groups * config.grad_accum * self.world_size
        self.steps_per_epoch = len(self.data.train) // self.global_groups
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.data.train)} training groups are fewer than one step's "
                             f"{self.global_groups} (batch_groups x grad_accum x processes)")
        self.total_steps = config.max_steps if config.max_steps > 0 else max(
            1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        if self.sharded:
            self.wrapped = fused
        else:
            self.wrapped, self.optimizer = self.accelerator.prepare(fused, self.optimizer)
        if trackers:  # the run's settings go with its metrics (scalars only: trackers take no None)
            self.accelerator.init_trackers("tuna", config={key: value for key, value in config.to_dict().items()
                                                           if isinstance(value, (bool, int, float, str))})
        self.log = MetricsLog(self.output_dir, self.accelerator if trackers else None, enabled=self.is_main)
        self.stop_requested = False
        self.prompt_free = None
        self.truncation_warned = False

    # ----------------------------------------------------------------- data
    def groups_for(self, step: int, micro: int) -> List[RankedExample]:
        """The groups of this process's micro-batch ``micro`` of optimizer step ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.train), generator=generator).tolist()
        step_groups = order[index * self.global_groups:(index + 1) * self.global_groups]
        size = self.config.batch_groups
        start = (micro * self.world_size + self.rank) * size
        return [self.data.train[i] for i in step_groups[start:start + size]]

    def make_batch(self, examples: Sequence[RankedExample]):
        groups = [tokenize_group(e, self.tokenizer, self.config.template, self.config.max_length,
                                 self.config.max_candidates) for e in examples]
        return pack(groups, self.config.packing, self.pad_id).to(self.accelerator.device)

    # --------------------------------------------------------------- forward
    def forward(self, batch, model=None):
        """Loss and metrics of a batch; no [N, V] logits anywhere."""
        return (model or self.wrapped)(batch)

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
            batch = self.make_batch(mine[start:start + self.config.batch_groups])
            with self.accelerator.autocast():  # the dtype path of training: the fused pass follows autocast
                sums, counts = self.wrapped(batch, scores_only=True)
            scores = batch.layout.to_matrix(sums / counts.to(sums.dtype) ** self.config.alpha)
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

    # ------------------------------------------------------------------ loop
    def _request_stop(self, signum, frame) -> None:
        logger.warning("signal %s: saving a checkpoint at the end of this step, then stopping", signum)
        self.stop_requested = True

    def _save(self, step: int, state: Dict) -> None:
        gathered = training_state(self.wrapped, self.optimizer) if self.sharded else (None, None)
        save_checkpoint(self.output_dir, step, self.model, self.optimizer, self.scheduler, state,
                        weights=gathered[0], optimizer_state=gathered[1],
                        rank=self.rank, world_size=self.world_size,
                        barrier=self.accelerator.wait_for_everyone if self.world_size > 1 else None,
                        keep=self.config.keep_checkpoints)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.accelerator.device)
        if self.world_size > 1:  # every process must take the same branch
            finite = self.accelerator.reduce(finite, reduction="sum")
        return bool(finite.item() == self.world_size)

    @staticmethod
    def fresh_state() -> Dict:
        """The run state a new run starts from (saved in every checkpoint's state.json)."""
        state = {"initial_eval": None, "best_eval": None, "skipped_nonfinite": 0, "tokens": 0, "targets": 0,
                 "tokens_saved": 0}
        state.update(dict.fromkeys(TRUNCATION_KEYS, 0))
        return state

    def run(self) -> Dict:
        config = self.config
        state = self.fresh_state()
        start_step = 0
        checkpoint = find_checkpoint(self.output_dir, config.resume)
        if checkpoint is not None:
            restore = functools.partial(restore_training_state, self.wrapped, self.optimizer) if self.sharded else None
            saved = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, self.rank, restore=restore)
            start_step = saved.pop("step")
            if saved.get("world_size", 1) != self.world_size:
                raise ValueError(f"checkpoint {checkpoint} was written by {saved['world_size']} processes, "
                                 f"this run has {self.world_size}: exact resume needs the same world size")
            saved.pop("world_size", None)
            state.update(saved)
            self.log.truncate_after(start_step)
            logger.info("resumed from %s at step %d", checkpoint, start_step)
        if self.is_main:
            logger.info("%s", self.describe(start_step))
        if state["initial_eval"] is None and self.data.eval:
            if self.is_main:
                logger.info("evaluating %d held-out groups before training",
                            min(len(self.data.eval), config.eval_groups))
            state["initial_eval"] = self.evaluate_with_controls()
            self.log.log(0, "eval", state["initial_eval"])

        previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        progress = None
        if config.progress and self.is_main:
            progress = tqdm(total=self.total_steps, initial=start_step, desc="tuna train", dynamic_ncols=True)
        started = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        final_step = start_step
        self.wrapped.train()
        try:
            for step in range(start_step, self.total_steps):
                step_metrics = self._train_step(step, state)
                final_step = step + 1
                window_tokens += step_metrics.pop("tokens_in_step")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                                         tok_s=f"{window_tokens / max(1e-9, time.perf_counter() - window_start):.0f}",
                                         cut=f"{state['prompts_truncated']}p/{state['responses_truncated']}r")
                if final_step % config.log_every == 0 or final_step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    step_metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                    self.log.log(final_step, "train", step_metrics)
                    window_tokens, window_start = 0, time.perf_counter()
                if (config.eval_every and final_step % config.eval_every == 0 and final_step != self.total_steps
                        and self.data.eval):  # eval_fraction 0 and no eval_data: nothing held out
                    self._eval_and_track(final_step, state)
                if final_step % config.save_every == 0 or self.stop_requested:
                    self._save(final_step, state)
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
                   "resumed_from_step": start_step if checkpoint is not None else None,
                   "steps_this_run": final_step - start_step}
        if not interrupted:
            final_eval = self._eval_and_track(final_step, state) if self.data.eval else None
            if final_step % config.save_every != 0:
                self._save(final_step, state)
            self._save_final_model()
            summary["final_eval"] = final_eval
        summary.update({k: state[k] for k in ("initial_eval", "best_eval", "skipped_nonfinite", "tokens", "targets",
                                              "tokens_saved")})
        summary["truncation"] = dict(truncation_summary(state), max_length=config.max_length)
        if self.is_main:
            write_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=1))
        self.log.close()
        self.accelerator.wait_for_everyone()
        if self.run_lock is not None:
            self.run_lock.release()
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

    def _eval_and_track(self, step: int, state: Dict) -> Dict[str, float]:
        result = self.evaluate_with_controls()
        self.log.log(step, "eval", result)
        best = state.get("best_eval")
        if best is None or (result["pair_accuracy"] or 0) > (best.get("pair_accuracy") or 0):
            state["best_eval"] = dict(result, step=step)
        return result

    def _train_step(self, step: int, state: Dict) -> Dict[str, float]:
        config = self.config
        accum = config.grad_accum
        sums = {"loss": 0.0, "rank_loss": 0.0, "mle_loss": 0.0, "pair_accuracy": 0.0}
        tokens = 0
        skip = False
        for micro in range(accum):
            batch = self.make_batch(self.groups_for(step, micro))
            if self.sharded:  # reduce-scatter the gradients once, after the last micro-batch
                self.wrapped.set_requires_gradient_sync(micro == accum - 1)
            sync = contextlib.nullcontext() if micro == accum - 1 or self.sharded else \
                self.accelerator.no_sync(self.wrapped)
            with sync:
                with self.accelerator.autocast():
                    loss, metrics = self.forward(batch)
                if not self._all_finite(loss):
                    if not config.skip_nonfinite:
                        raise NonFiniteLossError(
                            f"step {step + 1}: the loss is {float(loss.detach())}; the run stopped without saving "
                            f"(the last checkpoint in {self.output_dir / 'checkpoints'} is intact). Lower the "
                            "learning rate, check the data, or pass --skip-nonfinite to skip such steps.")
                    skip = True
                    break
                self.accelerator.backward(loss / accum)
            for key in ("rank_loss", "mle_loss", "pair_accuracy"):
                value = float(metrics[key])
                sums[key] += (0.0 if math.isnan(value) else value) / accum
            sums["loss"] += float(loss.detach()) / accum
            tokens += batch.stats["tokens"]
            state["tokens"] += batch.stats["tokens"] * self.world_size
            state["targets"] += batch.stats["targets"] * self.world_size
            state["tokens_saved"] += batch.stats["tokens_saved"] * self.world_size
            for key in TRUNCATION_KEYS:  # counted in collate.pack; training groups seen so far
                counted = batch.stats[key if key != "groups_seen" else "groups"]
                state[key] = state.get(key, 0) + counted * self.world_size
        if self.world_size > 1:  # log the mean over processes: the same numbers as one process would give
            keys = sorted(sums)
            vector = self.accelerator.reduce(torch.tensor([sums[k] for k in keys], device=self.accelerator.device),
                                             reduction="mean")
            sums = dict(zip(keys, vector.tolist()))
        grad_norm = float("nan")
        if skip:
            state["skipped_nonfinite"] += 1
            logger.warning("step %d: non-finite loss, step skipped (%d so far)", step + 1, state["skipped_nonfinite"])
        else:
            if config.max_grad_norm > 0:
                grad_norm = clip_grad_norm(self.wrapped.parameters(), config.max_grad_norm) if self.sharded else \
                    float(self.accelerator.clip_grad_norm_(self.wrapped.parameters(), config.max_grad_norm))
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._warn_truncation(state)
        return dict(sums, lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens_in_step=tokens,
                    skipped_nonfinite=state["skipped_nonfinite"], **truncation_summary(state))

    def _warn_truncation(self, state: Dict) -> None:
        """One warning per run when the share of truncated training groups passes ``truncation_warning``."""
        summary = truncation_summary(state)
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
