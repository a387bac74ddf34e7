"""Small helpers of a training step, each called by name in the stage's own loop (see Trainer)."""

from __future__ import annotations

import math
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from common.errors import UserError


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


class TrainingInterrupted(SystemExit):
    """Ctrl-C or SIGTERM: the state was saved and the process exits (130 or 143) without a traceback."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1, then a cosine to `min_ratio` at `total_steps` (Loshchilov & Hutter 2017)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay at `step`: ramps up as (1 + step) / (10 + step) with warm-up, so early weights fade fast."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def ema_tensors(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A model's parameters and buffers, in a fixed order, collected once (not walked every step)."""
    return list(model.parameters()), [b for b in model.buffers()]


@torch.no_grad()
def update_ema(ema: tuple[list[torch.Tensor], list[torch.Tensor]], model: tuple[list[torch.Tensor], list[torch.Tensor]],
               decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the parameters, one fused kernel for all of them;
    buffers (e.g. BatchNorm statistics) are copied. Both arguments come from `ema_tensors`. (no_grad reads the
    parameters as they are: detaching each first would add one dispatched op per parameter to every step.)"""
    (ema_params, ema_buffers), (params, buffers) = ema, model
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)


def scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                max_norm: float) -> torch.Tensor:
    """fp16's optimizer step: unscale this optimizer's gradients, clip them, step (GradScaler skips a step whose
    gradients overflowed); returns their norm. The caller updates the scale once per training step, after every
    optimizer. (accelerate's clip_grad_norm_ unscales every optimizer, and its optimizer step updates the scale:
    train-vae's second optimizer, the discriminator's, had its gradients unscaled twice.)"""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(optimizer)
    return norm.detach()


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put a model in eval mode for a block, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class StopSignals:
    """Turns the first Ctrl-C/SIGTERM into a flag the loop checks after each step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              f"(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
