"""Pretraining and fine-tuning: the `Trainer` builds a run's components once, steps, logs and checkpoints.

    data_facts = check_config(cfg, mode)             # training.config: what the checks learned about the data
    trainer = Trainer(cfg, mode, data_facts, dist, ckpt)   # ckpt: training.checkpointing.load_resume(...) or None
    exit_code = trainer.run()

The training step never waits for the GPU: loss sums, grad norms and the non-finite check stay on the device and are
read once per logging interval (`log_and_check_stop`), which is also when the ranks agree to stop after a SIGTERM.
Every checkpoint is `state_dict()` and every resume `load_state_dict()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model.checkpoint import model_payload, save_checkpoint
from model.flops import training_flops_per_clip
from pipeline.protocol import Loader
from training.build import build_ema, build_loader, build_mixup, make_model
from training.checkpointing import capture_rng_state
from training.config import Config, DataFacts, model_kind_for
from training.distributed import Dist, all_reduce, gather
from training.finite import NonFiniteLoss, optimizer_step, weights_may_be_saved
from training.loss import StepLoss
from training.metrics import MetricsLog, Window, peak_flops, skipped_samples
from training.optim import build_optimization
from training.progress import loader_state_for, progress_state, resume_position, resume_rng
from training.schedule import CosineSchedule
from training.step import GraphedStep

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

    from pipeline.mixup import VideoMixup

log = logging.getLogger("training")

NO_BAD = torch.iinfo(torch.int64).min  # "no non-finite step" in the max-reduced flags of log_and_check_stop


class StopRequest:
    """Set by SIGTERM (preemption; torchrun forwards it to every worker) or SIGUSR1 (Slurm's --signal warning)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


class Trainer:
    """A pretraining or fine-tuning run on this rank: typed components built once, then `run()`.

    Resuming: the checkpoint's model config and this rank's loader position are construction arguments (the
    architecture and where the pipeline starts depend on them); everything else goes through `load_state_dict`,
    called between building the stateful parts and wrapping them (DDP, torch.compile, the CUDA-graph step, which
    turns the optimizer's lr into device tensors)."""

    model: nn.Module  # the bare model: checkpoints hold its weights
    ddp_model: nn.Module  # what the step calls: `model`, in DDP and/or torch.compile
    loader: Loader  # pipeline.VideoLoader, or pipeline.synthetic.SyntheticLoader
    lr_schedule: CosineSchedule
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None  # fp16 only
    ema: ModelEmaV3 | None
    mixup: VideoMixup | None  # fine-tuning with mixup / cutmix
    graphed: GraphedStep | None  # run.cuda_graph_step
    metrics: MetricsLog  # rank 0 writes; elsewhere it does nothing

    def __init__(
        self,
        cfg: Config,
        mode: str,
        data_facts: DataFacts,
        dist: Dist,
        ckpt: dict | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.cfg, self.mode, self.data_facts, self.dist = cfg, mode, data_facts, dist
        self.model_kind = model_kind_for(mode)
        self.stop = stop or StopRequest()
        self.out_dir = Path(cfg.run.out_dir)
        self.step, self.samples = 0, 0  # optimizer steps; videos trained on (the schedule's position)
        torch.manual_seed(cfg.run.seed + dist.rank)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        resume_config = ckpt["model_config"] if ckpt else None
        self.model, self.model_cfg = make_model(cfg, mode, data_facts.num_classes, resume_config)
        self.model.to(dist.device).train()
        loader_state = loader_state_for(ckpt, dist.rank, dist.world_size, cfg.data.batch_size) if ckpt else None
        self.loader = build_loader(cfg, mode, dist, self.model_cfg, state=loader_state)
        opt = build_optimization(cfg, self.model, len(self.loader), dist.world_size, dist.device)
        self.lr_schedule, self.optimizer, self.scaler = opt.lr_schedule, opt.optimizer, opt.scaler
        self.total_steps, self.steps_per_epoch = opt.total_steps, opt.steps_per_epoch
        self.videos_per_step = self.schedule_batch = opt.videos_per_step
        self.ema = build_ema(cfg, self.model)
        self.mixup = build_mixup(cfg, data_facts.num_classes, dist.rank) if mode == "finetune" else None
        if ckpt is not None:
            self.load_state_dict(ckpt)
        self._build_runtime()

    # ------------------------------------------------------------------------------------------------- building
    def _build_runtime(self) -> None:
        """DDP and torch.compile around the model, metrics, the run's summary line, the CUDA-graph step."""
        cfg, dist = self.cfg, self.dist
        self.ddp_model: nn.Module = (
            self.model
            if dist.world_size == 1
            else DDP(self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        )
        if cfg.run.compile_mode:  # the whole model (DDP's buckets become graph breaks); checkpoints hold the bare one
            mode = None if cfg.run.compile_mode == "default" else cfg.run.compile_mode
            self.ddp_model = torch.compile(self.ddp_model, mode=mode)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.metrics = MetricsLog(self.out_dir, dist.is_main, cfg.run.tensorboard)
        self.flops_per_clip = training_flops_per_clip(self.model_cfg, self.model_kind, **cfg.data.masking)
        self.peak = peak_flops(cfg.run.peak_tflops, dist.device)
        self.stop_at = min(self.total_steps, cfg.run.stop_after_steps or self.total_steps)
        self.loss_fn = StepLoss(self.mode, self.ddp_model, cfg, dist.device, self.mixup)
        self._batches = self._epochs()
        # on the device until log_and_check_stop reads them: the loss summed over the window, the first non-finite step
        self.loss_sum = torch.zeros((), device=dist.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=dist.device)
        self.lr, self.grad_norm, self.skipped_steps = 0.0, None, 0
        self.window = Window()
        log.info(
            f"{self.mode}: {type(self.model).__name__} '{cfg.model.name}' "
            f"{sum(p.numel() for p in self.params) / 1e6:.1f}M params on {dist.world_size} x {dist.device.type}; "
            f"{self.videos_per_step} videos x {cfg.data.num_repeats} clips per step, {self.steps_per_epoch} "
            f"steps/epoch, {self.total_steps} steps (from {self.step} to {self.stop_at}), peak lr "
            f"{self.lr_schedule.base:.3g}"
        )
        if dist.is_main:
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        self.graphed = None
        if cfg.run.cuda_graph_step:
            self.graphed = GraphedStep(
                lambda inputs: self.loss_fn(inputs, mix=False), self.optimizer, self.params, cfg.optim.clip_grad
            )
            log.info("run.cuda_graph_step: the first 3 steps run eagerly, then each step replays one CUDA graph")

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The run as one checkpoint payload (training.checkpointing lists the keys). A collective: every rank calls
        it, contributing its RNG and loader states, and every rank gets the whole payload."""
        rng = capture_rng_state()
        if self.mixup is not None:
            rng["mixup"] = self.mixup.rng.bit_generator.state
        rngs, loaders = gather(rng), gather(self.loader.state_dict())
        shape = (self.dist.world_size, self.cfg.data.batch_size)
        progress = progress_state(self.samples, self.videos_per_step, self.schedule_batch, *shape, loaders)
        class_names = self.data_facts.class_names if self.model_kind == "classify" else None
        return {
            **model_payload(self.model_kind, self.model_cfg, self.model, class_names),
            "step": self.step,
            "epoch": self.loader.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "model_ema": self.ema.module.state_dict() if self.ema else None,
            "rng": rngs,
            "loader": loaders,
            "progress": progress,
            "train_config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from `ckpt` (a state_dict() payload): weights, optimizer, scaler, EMA, step, and this rank's RNG
        states last (building the model and the loader drew random numbers)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:  # a checkpoint without EMA weights starts the EMA at the model's
            self.ema.module.load_state_dict(ckpt.get("model_ema") or ckpt["model"])
        if ckpt["scheduler"] != self.lr_schedule.state_dict():
            log.info("note: lr schedule %s in the checkpoint, now %s", ckpt["scheduler"], self.lr_schedule.state_dict())
        at = resume_position(ckpt, self.lr_schedule, self.videos_per_step, self.total_steps)
        self.step, self.samples, self.lr_schedule = at.step, at.samples, at.schedule
        self.schedule_batch, self.total_steps = at.schedule_batch, at.total_steps
        resume_rng(ckpt, self.dist, self.cfg.data.batch_size, self.cfg.run.seed, self.step, self.mixup)

    def save(self) -> Path | None:
        """A checkpoint of this step, of finite weights only (training.finite). Its path on rank 0, None elsewhere."""
        if not weights_may_be_saved(self.model, self.ema, self.step, self.cfg.run.skip_nonfinite, self.dist.is_main):
            return None
        state = self.state_dict()
        if not self.dist.is_main:
            return None
        return save_checkpoint(state, self.out_dir, self.step, keep_last=self.cfg.run.ckpt_keep)

    # ----------------------------------------------------------------------------------------------------- step
    def _epochs(self) -> Iterator[dict]:
        """The loader's epochs back to back."""
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty and len(self.loader) == 0:
                raise RuntimeError("the data loader yields no batches")

    def next_batch(self) -> dict:
        """The next batch; the wait counts as data time."""
        t_wait = time.perf_counter()
        batch = next(self._batches)
        self.window.wait += time.perf_counter() - t_wait
        self.window.clips += batch["video"].shape[0]
        return batch

    def _backward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward over optim.grad_accum batches (DDP all-reduces on the last); unscaling, clipping.
        Returns (mean loss, grad norm: None unless clipping, skipping or logging needs it)."""
        o, scaler = self.cfg.optim, self.scaler
        step_loss = torch.zeros((), device=self.dist.device)
        for micro in range(o.grad_accum):
            batch = self.next_batch()
            sync_grads = micro == o.grad_accum - 1 or self.dist.world_size == 1
            with contextlib.nullcontext() if sync_grads else self.ddp_model.no_sync():
                loss = self.loss_fn(batch)
                (scaler.scale(loss / o.grad_accum) if scaler else loss / o.grad_accum).backward()
            step_loss += loss.detach() / o.grad_accum
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if o.clip_grad:
            return step_loss, torch.nn.utils.clip_grad_norm_(self.params, o.clip_grad)
        if self.cfg.run.skip_nonfinite or (self.step + 1) % self.cfg.run.log_interval == 0:
            return step_loss, torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return step_loss, None

    def train_step(self) -> None:
        """One optimizer step: forward, backward, clipping, AdamW (or one CUDA-graph replay of all that), EMA. The
        loss is summed on the device; a non-finite one is remembered there for log_and_check_stop (or, with
        run.skip_nonfinite, the step is skipped: a host sync per step)."""
        if self.graphed is not None:  # forward, backward, clipping and AdamW in one replay (check_step_options)
            self.lr = self.lr_schedule(self.samples / self.schedule_batch)
            self.graphed.set_lr(self.lr)
            step_loss, self.grad_norm = self.graphed(self.loss_fn.graph_inputs(self.next_batch()))
        else:
            self.lr = self.lr_schedule.apply(self.optimizer, self.samples / self.schedule_batch)
            step_loss, self.grad_norm = self._backward()
        # Gradients are already all-reduced, so every rank sees the same norm and decides alike.
        if self.cfg.run.skip_nonfinite and not torch.isfinite(self.grad_norm).item():
            self.skipped_steps += 1
            if self.dist.is_main:  # every rank decides alike: one line, not one per rank
                log.warning(
                    "step %d: non-finite loss or gradient, step skipped (%d so far)", self.step, self.skipped_steps
                )
        else:
            if self.scaler is not None or self.graphed is None:
                optimizer_step(self.optimizer, self.scaler, self.step, self.lr)
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            self.first_bad_step = torch.where(
                (self.first_bad_step < 0) & ~torch.isfinite(step_loss), self.step, self.first_bad_step
            )
            self.loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
            self.window.loss_steps += 1
        if self.scaler is not None:
            self.scaler.update()
        if self.graphed is None:  # a graphed step overwrites its gradients; dropping them would free the graph's memory
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples += self.videos_per_step

    # ------------------------------------------------------------------------------------------------------ run
    def log_and_check_stop(self) -> bool:
        """The one host sync of a logging interval: the earliest non-finite step on any rank (NonFiniteLoss) and any
        rank's stop request, then the window's metrics, logged on rank 0. Returns True when the ranks agree to stop."""
        dist, window = self.dist, self.window
        flags = torch.stack(
            [
                torch.where(self.first_bad_step >= 0, -self.first_bad_step, NO_BAD),
                torch.tensor(int(self.stop.signal is not None), device=dist.device),
            ]
        )
        all_reduce(flags, "max")
        if flags[0].item() != NO_BAD:
            raise NonFiniteLoss(
                f"the loss is not finite at step {-flags[0].item()}; stopped without saving (set "
                f"run.skip_nonfinite=true to skip such steps instead)"
            )
        zero = torch.zeros((), device=dist.device)
        sums = all_reduce(
            torch.stack([self.loss_sum, zero + window.clips, zero + window.wait, zero + skipped_samples(self.loader)])
        )
        elapsed = time.perf_counter() - window.t0
        clips_per_s = sums[1].item() / elapsed
        record = {
            "epoch": self.loader.epoch,
            "loss": sums[0].item() / (dist.world_size * max(window.loss_steps, 1)),
            "lr": self.lr,
            "grad_norm": None if self.grad_norm is None else self.grad_norm.item(),
            "clips_per_s": clips_per_s,
            "data_wait": sums[2].item() / (dist.world_size * elapsed),
            "skipped_samples": int(sums[3].item()),
        }
        if self.peak:
            record["mfu"] = self.flops_per_clip * clips_per_s / (dist.world_size * self.peak)
        if dist.device.type == "cuda":
            record["mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        self.metrics.log(self.step, record)
        self.loss_sum = torch.zeros((), device=dist.device)
        self.window = Window()
        return bool(flags[1].item())

    def _checkpoint(self) -> None:
        """An interval checkpoint, never of a model spoiled by NaNs; its time is not training throughput."""
        if all_reduce(self.first_bad_step.clone(), "max").item() >= 0:
            raise NonFiniteLoss(f"the loss is not finite at step {self.first_bad_step.item()}; stopped")
        t_save = time.perf_counter()
        self.save()
        self.window.t0 += time.perf_counter() - t_save

    def run(self) -> int:
        """Train to the end of the schedule (or run.stop_after_steps, or a stop request), checkpointing on the way
        and at the end. Exit status: 0, or 3 for a non-finite loss."""
        cfg, dist = self.cfg, self.dist
        self.window = Window()  # the clock starts now
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        stopped_by = None
        try:
            while self.step < self.stop_at:
                self.train_step()
                log_due = (
                    self.step % cfg.run.log_interval == 0
                    or self.step == self.stop_at
                    or (dist.world_size == 1 and self.stop.signal)
                )
                if log_due and self.log_and_check_stop():
                    stopped_by = self.stop.signal or "another rank's signal"
                    break
                if cfg.run.ckpt_interval and self.step % cfg.run.ckpt_interval == 0 and self.step < self.stop_at:
                    self._checkpoint()
            path = self.save() if cfg.run.ckpt_final or stopped_by else None
        except NonFiniteLoss as e:
            if dist.is_main:  # every rank raised the same (all-reduced) step: one line, not one per rank
                log.error("error: %s", e)
            self.metrics.close()
            return 3
        self.metrics.close()
        outcome = f"stopped by {stopped_by}" if stopped_by else "finished"
        log.info(
            f"{self.mode} {outcome} at step {self.step} of {self.total_steps}; checkpoint {path}"
            + ("; resume with --resume auto" if self.step < self.total_steps else "")
        )
        return 0
