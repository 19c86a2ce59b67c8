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
import torch.utils.checkpoint

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
    compile: bool = False          # torch.compile each decoder layer
    chunked_loss: bool = True      # LM head + loss a block of tokens at a time (no full logits in memory)
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
    return _kl_sum(student_logits, teacher_logits, temperature) / student_logits[..., 0].numel() * temperature ** 2


def _kl_sum(student_logits, teacher_logits, t: float):
    s = F.log_softmax(student_logits.float() / t, -1)
    p = F.log_softmax(teacher_logits.float() / t, -1)
    return (p.exp() * (p - s)).sum()


def _combine(ce, kd, cfg: TrainConfig):
    """The objective from its parts; logs are detached tensors (read once per step, no sync here)."""
    if cfg.objective == "ce":
        return ce, {"ce": ce.detach()}
    return cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * ce, {"ce": ce.detach(), "kd": kd.detach()}


def compute_loss(model, batch, cfg: TrainConfig, teacher=None):
    """Objective for one micro-batch of token ids ``(B, T)``: mean over its predicted tokens,
    from the full ``(B, T, vocab)`` logits."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    targets = batch[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    kd = None
    if cfg.objective == "kd":
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch, use_cache=False).logits[:, :-1]
        kd = distillation_loss(logits, teacher_logits, cfg.kd_temperature)
    return _combine(ce, kd, cfg)


# logit transforms some architectures apply after the LM head; the chunked loss leaves those models alone
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def lm_parts(model):
    """``(decoder, lm_head)`` of a Hugging Face causal LM (peft-wrapped or not) whose logits are
    exactly ``lm_head(decoder(ids).last_hidden_state)``, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _chunk_objective(head, h, targets, teacher_head, teacher_h, temperature: float):
    """Sums over one block of tokens: cross-entropy, and KL to the teacher when given."""
    logits = head(h)
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    if teacher_h is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_h)
    return ce, _kl_sum(logits, teacher_logits, temperature)


class CausalLMLoss(torch.nn.Module):
    """A causal LM with its training objective, in one forward (so DDP wraps one module).

    When the model allows it (:func:`lm_parts`), the decoder's last hidden states pass
    through the LM head and the loss a block of tokens at a time, each block recomputed in
    the backward pass: the ``(tokens x vocab)`` logits, their float copy and their gradient
    (several GiB at 8 x 1024 tokens and a 32k vocabulary) never exist at once. The value is
    the same as :func:`compute_loss` up to float rounding.
    """

    def __init__(self, model, cfg: TrainConfig, teacher=None, chunked: bool = True):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.teacher = [teacher]  # a list: the teacher is not a submodule (not wrapped, not trained, not saved)
        self.parts = lm_parts(model) if chunked else None
        self.teacher_parts = lm_parts(teacher) if chunked and teacher is not None else None
        if self.parts is not None and teacher is not None and self.teacher_parts is None:
            self.parts = None

    def forward(self, batch):
        teacher = self.teacher[0] if self.cfg.objective == "kd" else None
        if self.parts is None:
            return compute_loss(self.model, batch, self.cfg, teacher)
        decoder, head = self.parts
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = batch[:, 1:].reshape(-1)
        teacher_hidden = teacher_head = None
        if teacher is not None:
            teacher_decoder, teacher_head = self.teacher_parts
            with torch.no_grad():
                teacher_hidden = teacher_decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
            teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        rows = max(256, LOSS_CHUNK_ELEMENTS // head.weight.shape[0])
        ce = kd = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], rows):
            t_chunk = None if teacher_hidden is None else teacher_hidden[i:i + rows]
            c, k = torch.utils.checkpoint.checkpoint(_chunk_objective, head, hidden[i:i + rows], targets[i:i + rows], teacher_head,
                                                     t_chunk, self.cfg.kd_temperature, use_reentrant=False)
            ce, kd = ce + c, kd + k
        n = targets.numel()
        return _combine(ce / n, kd / n * self.cfg.kd_temperature ** 2, self.cfg)


LOSS_CHUNK_ELEMENTS = 1 << 25  # logits per block of the chunked loss (128 MiB in float32)


def compile_layers(model, backend: str = "inductor") -> int:
    """Compile each decoder layer of ``model`` in place (regional compilation: the layers
    share one compiled graph, so compiling costs one layer, not the whole model). Returns the
    number of layers compiled."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    layers = next((m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and n and len(m) == n), None)
    if layers is None:
        raise QuantuneError("--compile: could not find the model's list of decoder layers")
    from torch import _dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the limit's name differs across torch releases
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 4 * n))
    for layer in layers:
        layer.compile(backend=backend)
    return n


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


def train_step(train_model, batches, optimizer, scheduler, scaler, params, cfg: TrainConfig, device,
               dist=None) -> tuple[float, dict, float | None, float]:
    """One optimizer step over the micro-batches ``batches`` (token ids ``(B, T)`` each):
    forward and backward of each (gradients summed, DDP synchronising on the last), unscale,
    clip, step, schedule. Returns ``(loss, loss parts, gradient norm or None, lr used)``."""
    parts, total = {}, 0.0
    for micro, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)
        sync = dist.no_sync(train_model) if dist and micro < len(batches) - 1 else nullcontext()
        with sync:
            with autocast_context(cfg.precision, device):
                loss, logs = train_model(batch)
            loss = loss / len(batches)
            (scaler.scale(loss) if scaler else loss).backward()
        total = total + loss.detach()
        for k, v in logs.items():
            parts[k] = parts.get(k, 0.0) + v / len(batches)
    total, parts = float(total), {k: float(v) for k, v in parts.items()}  # one host sync per step
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
    lr_now = optimizer.param_groups[0]["lr"]
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return total, parts, None if grad_norm is None else float(grad_norm), lr_now


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
    loss_model = CausalLMLoss(model, cfg, teacher, chunked=cfg.chunked_loss)
    if cfg.compile:
        log(f"compiling {compile_layers(model)} decoder layers (the first steps include the compilation)")
    train_model = dist.wrap(loss_model) if dist else loss_model

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
    step, t0, timed_steps, timed_seconds, peak_seen = start_step, time.perf_counter(), 0, 0.0, 0
    try:
        for step in range(start_step, cfg.steps):
            step_start = time.perf_counter()
            batches = [data[order.indices(step, micro)] for micro in range(cfg.grad_accum)]
            total, parts, grad_norm, lr_now = train_step(train_model, batches, optimizer, scheduler, scaler, params,
                                                         cfg, device, dist)
            if dist:
                total = dist.mean(total)
            step_peak = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                step_peak = torch.cuda.max_memory_allocated(device)  # this step's peak; the run's is the max
                peak_seen = max(peak_seen, step_peak)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time.perf_counter() - step_start
            if step > start_step:  # the first step includes warm-up work (allocator, kernels)
                timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
            record = {"step": step + 1, "loss": total, "lr": lr_now, "seconds": seconds, **parts}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if step_peak is not None:
                record["peak_gpu_bytes"] = step_peak
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
    if device.type == "cuda":
        history["peak_gpu_bytes"] = max(history["peak_gpu_bytes"], peak_seen)
    history["config"] = asdict(cfg)
    return history
