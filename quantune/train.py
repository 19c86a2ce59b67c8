"""LoRA recovery fine-tuning: one readable training loop.

``train(model, data, cfg, ...)`` runs optimizer steps over packed token sequences with
gradient accumulation, mixed precision, a learning-rate schedule, gradient clipping,
periodic evaluation and checkpoints, and returns the history. The objective is next-token
cross-entropy, or knowledge distillation against a teacher's logits (the original
full-precision model), or a mix of the two. Data parallel (DDP) comes from
:mod:`quantune.distributed`; this loop only asks it for the rank and world size.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from quantune.config import QuantuneError
from quantune.data import BatchOrder
from quantune.qlinear import cached_weights
from quantune.schedules import SCALING_RULES, make_scheduler, scaled_lr

PRECISIONS = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit")
OBJECTIVES = ("ce", "kd")
STATE_FILE = "training_state.safetensors"


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8            # sequences per micro-batch on each process
    grad_accum: int = 1            # micro-batches per optimizer step
    seq_len: int = 512
    lr: float = 2e-4               # peak learning rate at base_batch_size
    lr_scaling: str = "none"       # linear | sqrt | none, against base_batch_size
    base_batch_size: int | None = None  # global batch the lr was tuned for (default: this run's)
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # wsd: steps of the final decay (default 20%)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    precision: str = "bf16"
    grad_checkpointing: bool = False
    cache_weights: bool = False    # decode the frozen quantized weights once (faster, one decoded copy in memory)
    objective: str = "ce"
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0          # weight of the distillation term (the rest is cross-entropy)
    eval_every: int = 0            # 0: evaluate before and after only
    save_every: int = 0            # 0: checkpoint only at the end or on interrupt
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self, world: int = 1) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be >= 1, got {self.grad_accum}"),
            (self.seq_len >= 2, f"sequence length must be >= 2, got {self.seq_len}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.lr_scaling in SCALING_RULES, f"unknown --lr-scaling {self.lr_scaling!r}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose {', '.join(PRECISIONS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
            (self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose {', '.join(OBJECTIVES)}"),
            (0 <= self.kd_alpha <= 1, f"kd alpha must lie in [0, 1], got {self.kd_alpha}"),
            (self.kd_temperature > 0, f"kd temperature must be positive, got {self.kd_temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise QuantuneError(message)

    def global_batch(self, world: int = 1) -> int:
        return self.batch_size * self.grad_accum * world

    def peak_lr(self, world: int = 1) -> float:
        base = self.base_batch_size or self.global_batch(world)
        return scaled_lr(self.lr, self.global_batch(world), base, self.lr_scaling)


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params, cfg: TrainConfig, lr: float, device: torch.device):
    params = list(params)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise QuantuneError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=cfg.weight_decay)
    fused = device.type == "cuda"  # the fused CUDA kernel; foreach elsewhere
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """Mean over tokens of KL(p_teacher || p_student) at ``temperature``, times T^2 (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, -1)
    p = F.log_softmax(teacher_logits.float() / t, -1)
    kl = (p.exp() * (p - s)).sum(-1)
    return kl.mean() * t * t


def compute_loss(model, batch, cfg: TrainConfig, teacher=None):
    """Objective for one micro-batch of token ids ``(B, T)``: mean over its predicted tokens."""
    out = model(input_ids=batch, use_cache=False)
    logits = out.logits[:, :-1]
    targets = batch[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if cfg.objective == "ce":
        return ce, {"ce": float(ce.detach())}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch, use_cache=False).logits[:, :-1]
    kd = distillation_loss(logits, teacher_logits, cfg.kd_temperature)
    loss = cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * ce
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}


@torch.no_grad()
def evaluate_perplexity(model, windows: torch.Tensor, precision: str, device: torch.device,
                        batch_size: int = 4) -> float:
    """Perplexity of ``model`` over token windows ``(N, T)`` (mean NLL over all predicted tokens)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size].to(device)
        with autocast_context(precision, device):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_bytes": torch.cuda.max_memory_allocated(device)}
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def save_checkpoint(out_dir: Path, step: int, peft_model, optimizer, scheduler, scaler, extra: dict,
                    keep: int) -> Path:
    """``out_dir/checkpoints/step-NNNNNN``: the adapter (peft format) and the training state,
    written to a temporary folder and renamed, so a crash never leaves a half checkpoint."""
    from quantune.checkpoint import save_training_state

    root = out_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(str(tmp))
    save_training_state(tmp / STATE_FILE, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                        extra=extra)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def restore_checkpoint(ckpt: Path, peft_model, optimizer, scheduler, scaler, device) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from quantune.checkpoint import load_training_state

    weights = load_file(str(ckpt / "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise QuantuneError(f"checkpoint {ckpt} does not fit this model: unexpected {result.unexpected_keys[:3]}")
    # optimizer state follows its parameters' devices inside load_state_dict (AdamW keeps `step` on the CPU)
    return load_training_state(ckpt / STATE_FILE, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def train(model, data: torch.Tensor, cfg: TrainConfig, *, out_dir: Path, device: torch.device,
          eval_windows: torch.Tensor | None = None, teacher=None, resume: bool = False, dist=None,
          log=print) -> dict:
    """Fine-tune the trainable parameters of ``model`` (a peft model) on ``data`` ``(N, T)``.

    ``dist`` is a :class:`quantune.distributed.DistContext` (None: one process). Returns
    the history: per-step loss and learning rate, evaluations, tokens/s, peak memory.
    """
    world, rank = (dist.world, dist.rank) if dist else (1, 0)
    is_main = rank == 0
    cfg.validate(world)
    if cfg.objective == "kd" and teacher is None:
        raise QuantuneError("the distillation objective needs a teacher model (--teacher)")
    order = BatchOrder(len(data), cfg.batch_size, cfg.grad_accum, cfg.seed, world, rank)
    peft_model = model
    params = trainable_parameters(model)
    if not params:
        raise QuantuneError("the model has no trainable parameters")
    lr = cfg.peak_lr(world)
    optimizer = make_optimizer(params, cfg, lr, device)
    scheduler = make_scheduler(optimizer, cfg.steps, cfg.schedule, cfg.warmup_steps, cfg.decay_steps, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_model = dist.wrap(model) if dist else model

    history = {"steps": [], "evals": [], "lr_peak": lr, "global_batch": cfg.global_batch(world), "world": world}
    start_step = 0
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise QuantuneError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
        state = restore_checkpoint(ckpt, peft_model, optimizer, scheduler, scaler, device)
        start_step = state["step"]
        history = state["extra"].get("history", history)
        log(f"resumed from {ckpt} at step {start_step}")

    def checkpoint(step):
        if is_main:
            path = save_checkpoint(out_dir, step, peft_model, optimizer, scheduler, scaler,
                                   {"history": history}, cfg.keep_checkpoints)
            log(f"checkpoint: {path}")
        if dist:
            dist.barrier()

    def run_eval(step):
        if eval_windows is not None and is_main:
            ppl = evaluate_perplexity(model, eval_windows, cfg.precision, device)
            history["evals"].append({"step": step, "ppl": ppl})
            log(f"step {step}: eval perplexity {ppl:.3f}")

    if start_step == 0:
        run_eval(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_step = cfg.global_batch(world) * (cfg.seq_len - 1)
    stack = ExitStack()  # closed in the finally below, whatever ends the loop
    if cfg.cache_weights:
        stack.enter_context(cached_weights(model, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.precision, torch.float32)))
    train_model.train()
    step, t0, timed_steps, timed_seconds = start_step, time.perf_counter(), 0, 0.0
    try:
        for step in range(start_step, cfg.steps):
            step_start = time.perf_counter()
            parts = {}
            total = 0.0
            for micro in range(cfg.grad_accum):
                batch = data[order.indices(step, micro)].to(device)
                sync = dist.no_sync(train_model) if dist and micro < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    with autocast_context(cfg.precision, device):
                        loss, logs = compute_loss(train_model, batch, cfg, teacher)
                    loss = loss / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                total += float(loss.detach())
                for k, v in logs.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                         if cfg.max_grad_norm else None)
            lr_now = optimizer.param_groups[0]["lr"]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if dist:
                total = dist.mean(total)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - step_start
            if step > start_step:  # the first step includes warm-up work (allocator, kernels)
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
            record = {"step": step + 1, "loss": total, "lr": lr_now, "seconds": seconds, **parts}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            history["steps"].append(record)
            if is_main and (cfg.log_every and (step + 1) % cfg.log_every == 0 or step == start_step):
                log(f"step {step + 1}/{cfg.steps}: loss {total:.4f} lr {lr_now:.3g} "
                    f"({tokens_per_step / seconds:,.0f} tokens/s)")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                run_eval(step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                checkpoint(step + 1)
    except KeyboardInterrupt:
        done = len(history["steps"]) and history["steps"][-1]["step"]
        log(f"interrupted: saving a checkpoint at step {done}")
        checkpoint(done)
        raise
    finally:
        stack.close()
    run_eval(cfg.steps)
    checkpoint(cfg.steps)
    history["tokens_per_second"] = tokens_per_step * timed_steps / timed_seconds if timed_seconds else None
    history["train_seconds"] = time.perf_counter() - t0
    history.update(peak_memory(device))
    history["config"] = asdict(cfg)
    return history
