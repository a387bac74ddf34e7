"""Where and in what precision a stage runs: accelerate on CUDA when present, the CPU otherwise."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import TorchDynamoPlugin


def resolve_mixed_precision(setting: str, key: str = "mixed_precision") -> str:
    """The precision a stage trains in: never mixed on CPU (bf16/fp16 matmuls are very slow there);
    on CUDA an explicit config value wins, and `auto` defers to `accelerate launch --mixed_precision` /
    `accelerate config` (the ACCELERATE_MIXED_PRECISION they set), else bf16 (fp16 on older GPUs)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() or None
    if not torch.cuda.is_available():
        if setting in ("fp16", "bf16") or launcher in ("fp16", "bf16"):
            print(f"note: mixed precision {setting if setting in ('fp16', 'bf16') else launcher} ignored: "
                  f"no CUDA device, training in fp32 on the CPU")
        return "no"
    if setting == "auto":
        return launcher or ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if launcher and launcher != setting:
        print(f"note: {key}={setting} from the config overrides the launcher's mixed precision {launcher}")
    return setting


def make_accelerator(mixed_precision: str = "no", compile_mode: str = "auto") -> Accelerator:
    """An Accelerator in `mixed_precision` (already resolved), on CUDA when there is a GPU; otherwise the
    CPU, where several processes started by `accelerate launch --multi_gpu` / torchrun train over gloo.

    accelerate keeps one process-wide state that refuses a second precision or compile setting; stages
    that run one after another in one process (a notebook, the tests) may each want their own, so
    that state is reset here. The process group (accelerate's PartialState) is kept. An earlier
    stage's Accelerator reads the shared state too, so build each stage's when the stage starts.
    """
    dynamo = None if compile_mode == "auto" else TorchDynamoPlugin(
        backend="no" if compile_mode == "no" else "inductor", mode=None if compile_mode == "no" else compile_mode)
    if AcceleratorState._shared_state:  # a stage before this one in the same process: start fresh
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    if torch.cuda.is_available():  # TF32 matmuls and convolutions: fp32 accuracy is not needed for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False, dynamo_plugin=dynamo)


def process_state() -> PartialState:
    """Rank, world size and device for work that trains nothing (encoding): no Accelerator, no precision."""
    return PartialState(cpu=not torch.cuda.is_available())
