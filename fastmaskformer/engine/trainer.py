"""Iteration-based training loop (detectron2's ``SimpleTrainer`` shape, DESIGN 5).

One iteration = ``grad_accum`` micro-batches of ``batch_size / (world_size * grad_accum)``
images per rank, their gradients summed (each loss divided by ``grad_accum``), full-model
gradient clipping, one AdamW step, one scheduler step. ``cfg.solver`` drives everything:
``max_iter``, ``eval_period``, ``checkpoint_period``, ``keep_checkpoints``, ``amp`` (bf16
autocast), ``seed``, ``fsdp`` and ``activation_checkpointing`` (EoMT; ``sharding.py``: FSDP2
replaces DDP under torchrun, checkpoints stay full state dicts written by rank 0, so one
file serves one process, DDP and FSDP alike).

Outputs in ``output_dir``: ``config.yaml``, ``metrics.jsonl`` (one JSON object per logged
iteration: iter, lr, every loss term, total_loss, grad_norm, images_per_s, time; evaluation
lines carry "eval"), ``model_{iter:07d}.pt`` checkpoints (see ``checkpoint.py``), TensorBoard
events when ``tensorboard`` is installed.

Exact resume: the sampler's position, every rank's RNG states (each rank restores its own, so
dropout masks stay different across ranks), the optimiser and the scheduler are in the
checkpoint, and each sample's augmentation depends only on its position in the seeded sample
stream, so a run resumed from iteration k computes the same iterations k+1.. as an
uninterrupted run (bit-exact on the CPU in deterministic mode with the same thread count).
Resuming needs the number of processes the checkpoint was written with; any other number is
refused with a CheckpointError.
Note that with ``grad_accum > 1`` num_masks is counted per micro-batch, so accumulation matches
a large batch for the cross-entropy term but only approximately for focal and dice.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..config import Config
from ..data import TrainingSampler, build_dataset, collate, worker_init_fn
from ..data.bad_samples import ON_BAD_SAMPLE, SkipBadSamples
from ..data.errors import DatasetError
from ..data.metadata import check_label_space
from ..losses import build_criterion
from ..modeling import build_model
from . import distributed as du
from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    previous_checkpoint,
    resolve_resume,
    restore_rng_state,
)
from .optim import build_lr_scheduler, build_optimizer, clip_grad_norm
from .sharding import check_options as check_sharding_options
from .sharding import (
    enable_activation_checkpointing,
    full_state,
    shard_model,
    shard_model_state,
    shard_optimizer_state,
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the iteration and terms."""


def set_deterministic(enabled: bool = True) -> None:
    """Deterministic kernels (warn where none exists) and no cuDNN autotuning."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _ResumedSampler(Sampler):
    """A TrainingSampler started ``start`` samples into its (infinite) per-rank stream."""

    def __init__(self, sampler: TrainingSampler, start: int):
        per_rank = -(-sampler.size // sampler.world_size)  # samples per rank and epoch
        self.sampler = sampler
        self.sampler.set_epoch(sampler.epoch + start // per_rank)
        self.skip = start % per_rank

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        return it


def _output_names(outputs) -> list[str]:
    return [f.name for f in dataclasses.fields(outputs)]


def model_losses(model: nn.Module, criterion: nn.Module | None, outputs, targets,
                 input_size: tuple[int, int]) -> tuple[dict, torch.Tensor]:
    """(unweighted loss terms, weighted total) for MaskFormer (criterion) or the per-pixel
    baselines (their own ``losses``, summed with weight 1 as in the official configs).
    ``input_size``: the padded batch's (H, W), where the targets live (not always 4x the
    stride-4 outputs: size_divisibility 0). Outputs are cast to float32 first: losses always
    run in fp32."""
    outputs = type(outputs)(*(t.float() for t in outputs.as_tuple()))
    if criterion is None:
        losses = model.losses(outputs, targets, input_size)
        return losses, sum(losses.values())
    losses = criterion(outputs, targets, input_size)
    return losses, criterion.total(losses)


class Trainer:
    """Builds model, criterion, optimiser, scheduler and data from a ``Config`` and trains.

    device: "cpu" | "cuda" | None (auto). resume: None, "auto" (newest checkpoint in
    output_dir, if any), a checkpoint file or a run folder. weights: a checkpoint whose model
    weights start a new run (fine-tuning, e.g. ``convert``'s output; a checkpoint to resume wins).
    skip_nonfinite: drop the update of an iteration whose loss or gradient is NaN/inf instead of
    stopping. train_dataset / eval_dataset:
    override the datasets built from ``cfg.data`` (the demo and tests use this).
    evaluate_fn(model) -> dict of metrics replaces the default evaluation on ``eval_dataset``.
    """

    def __init__(self, cfg: Config, output_dir: str | os.PathLike, *, device: str | None = None,
                 resume: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                 skip_nonfinite: bool = False,
                 deterministic: bool = False, progress: bool = True, log_period: int = 20,
                 num_workers: int | None = None, train_dataset=None, eval_dataset=None,
                 evaluate_fn: Callable[[nn.Module], dict] | None = None):
        self.cfg = cfg
        if cfg.data.root:  # absolute in config.yaml and checkpoints: eval/predict work from any directory
            cfg.data.root = os.path.abspath(os.path.expanduser(str(cfg.data.root)))
        self.output_dir = Path(output_dir)
        self.skip_nonfinite = skip_nonfinite
        self.progress = progress
        self.log_period = max(1, int(log_period))
        self.dist = du.init_distributed(device)
        self.device = self.dist.device
        if deterministic:
            set_deterministic(True)
        solver = cfg.solver
        world = self.dist.world_size
        if solver.batch_size % (world * solver.grad_accum):
            raise ValueError(f"solver.batch_size {solver.batch_size} is not divisible by world_size {world} "
                             f"x solver.grad_accum {solver.grad_accum}")
        self.micro_batch = solver.batch_size // (world * solver.grad_accum)
        check_sharding_options(solver, cfg.model.meta_arch, world)

        # datasets first: a missing dataset fails before any model is built, not mid-run
        self.train_dataset = train_dataset if train_dataset is not None else build_dataset(
            cfg.data, cfg.data.train_split, train=True, seed=solver.seed)
        if cfg.data.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, got {cfg.data.on_bad_sample!r}")
        self.metadata = getattr(self.train_dataset, "metadata", None)
        if self.metadata is not None:
            check_label_space(cfg.model.num_classes, self.metadata, f"config {cfg.name!r} (model.num_classes)",
                              cfg.data.dataset)
        if cfg.data.on_bad_sample == "skip":
            self.train_dataset = SkipBadSamples(self.train_dataset)
        self.bad_files: dict[str, str] = {}  # unreadable training file -> reason (skip mode)
        self.bad_samples = 0  # draws replaced because their sample was unreadable
        self.evaluate_fn = evaluate_fn
        if eval_dataset is None and evaluate_fn is None and solver.eval_period > 0:
            eval_dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
        self.eval_dataset = eval_dataset

        seed_all(solver.seed)  # same initial weights on every rank
        self.model = build_model(cfg.model).to(self.device)
        self.model.train()
        if solver.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if solver.fsdp:
            shard_model(self.model)
        self.criterion = None if hasattr(self.model, "losses") else build_criterion(cfg).to(self.device)
        if self.criterion is not None and hasattr(self.criterion, "seed"):
            self.criterion.seed += self.dist.rank  # each rank draws its own points (as the official global RNG)
        if self.mask_annealing is not None:
            self.mask_annealing.seed += self.dist.rank  # and drops its own masks (EoMT)
        self.optimizer = build_optimizer(self.model, solver)
        self.scheduler = build_lr_scheduler(self.optimizer, solver)
        self.ddp = self.model
        self.forward = self.ddp  # the model forward the step calls (compiled with solver.compile)
        if world > 1 and not solver.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if solver.compile:
            # The model forward is one graph; the criterion's losses() is one graph around the
            # matcher's solver operator (its device->host copy is the step's only host sync).
            # Checkpoints keep reading self.model.
            self.forward = torch.compile(self.ddp)
            if self.criterion is not None:
                self.criterion.losses = torch.compile(self.criterion.losses)
        seed_all(solver.seed + self.dist.rank)  # dropout differs across ranks, as detectron2

        self.num_workers = cfg.data.num_workers if num_workers is None else num_workers
        self.checkpoints = CheckpointManager(self.output_dir, solver.keep_checkpoints)
        self.iteration = 0
        self.samples = 0  # samples this rank has drawn from its sampler stream
        self.skipped = 0
        self.history: list[dict] = []
        resume_path = resolve_resume(resume, self.output_dir)
        if resume_path is not None:
            self.load(resume_path)
        elif weights is not None:
            self.load_weights(weights)

    # ------------------------------------------------------------------ state
    def state_dict(self, rng: list[dict], model: dict, optimizer: dict) -> dict:
        """The checkpoint contents; ``rng``: every rank's ``capture_rng_state()``, indexed by rank;
        ``model`` / ``optimizer``: their full state dicts (:meth:`full_states`)."""
        return {
            "model": model,
            "config": self.cfg.to_dict(),
            "iteration": self.iteration,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": {"samples": self.samples, "seed": self.cfg.solver.seed, "world_size": self.dist.world_size},
            "skipped": self.skipped,
            "bad_samples": {"count": self.bad_samples, "files": self.bad_files},
        }

    def _check_saved_classes(self, state: dict, path: Path) -> None:
        """The checkpoint's classes (its stored config) against this run's label space."""
        saved_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
        if self.metadata is not None:
            saved_classes = (saved_cfg.get("model") or {}).get("num_classes")
            check_label_space(saved_classes, self.metadata, f"checkpoint {path}", self.cfg.data.dataset)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Start from a checkpoint's model weights only (iteration 0, fresh optimiser and schedule)."""
        path = Path(path)
        state = load_checkpoint(path, map_location="cpu")
        self._check_saved_classes(state, path)
        load_model_weights(self.model, shard_model_state(state["model"], self.model), path,
                           "; --weights needs a checkpoint of this architecture")

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint written by :meth:`save` (any rank reads the same file)."""
        path = Path(path)
        try:
            state = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            prev = previous_checkpoint(path)
            hint = f"; the previous checkpoint {prev} is intact: resume from it" if prev else ""
            raise CheckpointError(f"{exc}{hint}") from exc
        self._check_saved_classes(state, path)
        missing = {"optimizer", "scheduler", "iteration", "rng", "data"} - set(state)
        if missing:
            raise CheckpointError(f"checkpoint {path} holds model weights only (no {sorted(missing)}); "
                                  "it can initialise eval/predict or a new run (--weights) but not resume training")
        saved, world = state["data"]["world_size"], self.dist.world_size
        if saved != world:
            raise CheckpointError(f"checkpoint {path} was written by {saved} processes, this run has {world}: each rank "
                                  f"resumes its own RNG state and data position, so resume with {saved} processes")
        if not isinstance(state["rng"], list) or len(state["rng"]) != world:
            raise CheckpointError(f"checkpoint {path} has no per-rank RNG states (written by an older fastmaskformer); "
                                  "it cannot resume exactly")
        load_model_weights(self.model, shard_model_state(state["model"], self.model), path,
                           f"; resume with the config it was written with ({path.parent / 'config.yaml'})")
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.samples = int(state["data"]["samples"])
        self.skipped = int(state.get("skipped", 0))
        bad = state.get("bad_samples") or {}
        self.bad_samples, self.bad_files = int(bad.get("count", 0)), dict(bad.get("files", {}))
        restore_rng_state(state["rng"][self.dist.rank])
        if self.criterion is not None and "criterion" in state["rng"][self.dist.rank]:
            # The criterion's own point generator (Mask2Former), per rank like the global RNGs.
            self.criterion.load_state_dict(state["rng"][self.dist.rank]["criterion"])
        if self.mask_annealing is not None and "mask_annealing" in state["rng"][self.dist.rank]:
            # EoMT's mask-dropping generator, per rank (the model state holds rank 0's)
            self.mask_annealing.set_extra_state(state["rng"][self.dist.rank]["mask_annealing"])

    @property
    def mask_annealing(self):
        """EoMT's ``MaskAnnealing`` (None for the other architectures)."""
        return getattr(self.model, "mask_annealing", None)

    def capture_rng(self) -> dict:
        """This rank's global RNG states plus the criterion's state (its point generator) and
        EoMT's mask-annealing state (its generator)."""
        rng = capture_rng_state()
        if self.criterion is not None and self.criterion.state_dict():
            rng["criterion"] = self.criterion.state_dict()
        if self.mask_annealing is not None:
            rng["mask_annealing"] = self.mask_annealing.get_extra_state()
        return rng

    def save(self) -> Path | None:
        """Checkpoint the current iteration (every rank sends its RNG state, rank 0 writes, every
        rank waits)."""
        rng = du.gather_to_main(self.capture_rng())
        model, optimizer = self.full_states()
        path = None
        if self.dist.is_main:
            bad = [n for n, p in model.items()  # (EoMT's extra state is a dict)
                   if torch.is_tensor(p) and p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteLossError(f"refusing to write a checkpoint at iteration {self.iteration}: "
                                         f"non-finite values in {bad[:3]}")
            path = self.checkpoints.save(self.iteration, self.state_dict(rng, model, optimizer))
        du.barrier()
        return path

    def full_states(self) -> tuple[dict, dict]:
        """The model's and the optimiser's full state dicts (FSDP shards gathered: every rank calls it)."""
        return full_state(self.model.state_dict()), full_state(self.optimizer.state_dict())

    # ------------------------------------------------------------------ data
    def _loader(self) -> DataLoader:
        sampler = TrainingSampler(len(self.train_dataset), self.cfg.solver.seed, shuffle=True, infinite=True,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        return DataLoader(
            self.train_dataset, batch_size=self.micro_batch, sampler=_ResumedSampler(sampler, self.samples),
            num_workers=self.num_workers, collate_fn=collate, drop_last=True, worker_init_fn=worker_init_fn,
            # own generator: creating the iterator must not consume the global torch RNG
            generator=torch.Generator().manual_seed(self.cfg.solver.seed + 7919 * self.dist.rank),
            persistent_workers=self.num_workers > 0, pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------------ one iteration
    def _micro_step(self, batch: dict, sync: bool) -> dict[str, float]:
        """Forward + backward of one micro-batch; returns the loss terms and ``total_loss``.
        Non-finite model outputs (the matcher cannot run on them) come back as NaN entries
        named after the output."""
        images, _ = self.model.preprocess(batch["images"])
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.solver.amp)
        no_sync = self.ddp.no_sync() if (not sync and self.ddp is not self.model) else nullcontext()
        if self.cfg.solver.fsdp:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
            self.model.set_requires_gradient_sync(sync)
        with no_sync:
            with autocast:
                outputs = self.forward(images)
            bad = [name for name, t in zip(_output_names(outputs), outputs.as_tuple()) if not torch.isfinite(t).all()]
            if bad:
                # a zero backward through every parameter keeps DDP ranks in step; the update is dropped
                (sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0).backward()
                return {name: math.nan for name in bad}
            losses, total = model_losses(self.model, self.criterion, outputs, batch["targets"], images.shape[-2:])
            (total / self.cfg.solver.grad_accum).backward()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total_loss"] = float(total.detach())
        return values

    def run_step(self, data_iter) -> dict:
        """One optimiser step; returns the logged scalars (loss terms averaged over micro-batches)."""
        accum = self.cfg.solver.grad_accum
        sums: dict[str, float] = {}
        if self.mask_annealing is not None:  # EoMT: this iteration's mask probabilities (official: per step)
            self.mask_annealing.set_step(self.iteration)
        for micro in range(accum):
            batch = next(data_iter)
            self.samples += self.micro_batch
            if batch.get("bad_samples"):
                self._bad_samples(batch["bad_samples"])
            for k, v in self._micro_step(batch, sync=micro == accum - 1).items():
                sums[k] = sums.get(k, 0.0) + v / accum
        if self.cfg.data.on_bad_sample == "skip":
            self._check_bad_fraction()
        grad_norm = float(clip_grad_norm(self.model.parameters(), self.cfg.solver.clip_grad_norm))
        lr = self._head_lr()
        finite = all(math.isfinite(v) for v in sums.values()) and math.isfinite(grad_norm)
        if du.any_rank(not finite, self.device):
            self._non_finite(sums, grad_norm)  # raises unless skip_nonfinite
            sums = {"skipped": 1.0}  # the terms may differ across ranks: log none of them
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        return {**sums, "grad_norm": grad_norm, "lr": lr}

    def _bad_samples(self, bad: list) -> None:
        """Log each newly seen unreadable file once and count the replaced draws."""
        for path, reason in bad:
            self.bad_samples += 1
            if path in self.bad_files:
                continue
            self.bad_files[path] = reason
            print(f"warning: skipping unreadable training sample (replaced by the next readable one): {reason}",
                  file=sys.stderr)

    def _check_bad_fraction(self) -> None:
        """Stop (every rank together) once a rank has seen more than ``data.max_bad_fraction`` of
        the training files unreadable."""
        limit, total = self.cfg.data.max_bad_fraction, len(self.train_dataset)
        exceeded = len(self.bad_files) > limit * total
        if du.any_rank(exceeded, self.device):
            last = next(reversed(self.bad_files.values()), "on another rank")
            raise DatasetError(
                f"{len(self.bad_files)} of {total} training samples are unreadable, more than "
                f"data.max_bad_fraction={limit}; last: {last} (fix or remove them and resume)")

    def _non_finite(self, sums: dict, grad_norm: float) -> None:
        bad = {k: v for k, v in sums.items() if not math.isfinite(v)}
        what = ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else f"gradient norm {grad_norm}"
        terms = ", ".join(f"{k}={v:.4g}" for k, v in sums.items())
        if not self.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iteration + 1}: {what} (all terms: {terms}); stopped "
                f"without saving this step; lower the learning rate or pass --skip-nonfinite")
        self.skipped += 1
        if self.dist.is_main:
            print(f"warning: skipped iteration {self.iteration + 1}: {what}")

    def _head_lr(self) -> float:
        heads = [g["lr"] for g in self.optimizer.param_groups if not g.get("name", "").startswith("backbone")]
        return float(max(heads or [g["lr"] for g in self.optimizer.param_groups]))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Metrics of the current weights (``evaluate_fn`` or the default evaluator)."""
        self.model.eval()
        try:
            if self.evaluate_fn is not None:
                return self.evaluate_fn(self.model)
            from .evaluator import evaluate_dataset

            return evaluate_dataset(self.model, self.eval_dataset, self.cfg, device=self.device,
                                    num_workers=self.num_workers, progress=False)
        finally:
            self.model.train()

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        """Train from ``self.iteration`` to ``cfg.solver.max_iter``; returns the logged records."""
        solver = self.cfg.solver
        main = self.dist.is_main
        if main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "config.yaml").write_text(self.cfg.to_yaml())
            except OSError as exc:  # read-only, full, or not a folder: before any iteration is spent
                raise CheckpointWriteError(f"cannot write to the output folder {self.output_dir} "
                                           f"({exc.strerror or exc}); choose another --output") from exc
        logger = _MetricsLogger(self.output_dir, enabled=main)
        data_iter = iter(self._loader())
        bar = _progress(self.iteration, solver.max_iter, enabled=main and self.progress)
        start_time = last_time = time.perf_counter()
        last_iter = self.iteration
        try:
            while self.iteration < solver.max_iter:
                record = self.run_step(data_iter)
                it = self.iteration
                is_last = it == solver.max_iter
                if it % self.log_period == 0 or is_last:
                    now = time.perf_counter()
                    if self.cfg.data.on_bad_sample == "skip":
                        record["bad_samples"] = float(self.bad_samples)
                    record = du.all_reduce_mean(record, self.device)
                    if "bad_samples" in record:  # summed over ranks: replaced draws so far
                        record["bad_samples"] = int(round(record["bad_samples"] * self.dist.world_size))
                    record["images_per_s"] = (it - last_iter) * solver.batch_size / max(now - last_time, 1e-9)
                    record["time"] = now - start_time
                    record = {"iter": it, **record}
                    last_time, last_iter = now, it
                    logger.log(record)
                    self.history.append(record)
                    if bar is not None and "total_loss" in record:
                        bar.set_postfix(loss=f"{record['total_loss']:.3f}", img_s=f"{record['images_per_s']:.1f}",
                                        lr=f"{record['lr']:.2e}")
                if bar is not None:
                    bar.update(1)
                paused = time.perf_counter()
                if solver.eval_period > 0 and (it % solver.eval_period == 0 or is_last):
                    metrics = self.evaluate()
                    logger.log({"iter": it, "eval": _scalars(metrics)})
                    self.history.append({"iter": it, "eval": metrics})
                if solver.checkpoint_period > 0 and (it % solver.checkpoint_period == 0 or is_last):
                    self.save()
                last_time += time.perf_counter() - paused  # images/s counts training time only
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        return self.history


def _scalars(metrics: dict, prefix: str = "") -> dict:
    """Nested metric dicts -> flat {"a/b": float}, dropping per-class lists."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def _progress(initial: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True)


class _MetricsLogger:
    """metrics.jsonl (appended, so a resumed run continues the file) + optional TensorBoard."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            it = record["iter"]
            scalars = _scalars(record["eval"], "eval/") if "eval" in record else {
                f"train/{k}": v for k, v in record.items() if k != "iter"}
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, it)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
