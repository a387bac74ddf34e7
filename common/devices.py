"""Where and in what precision a stage runs: accelerate on CUDA when present, the CPU otherwise."""

from __future__ import annotations

import os
import re

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import get_available_trackers
from accelerate.utils import (DynamoBackend, GradientAccumulationPlugin, ProjectConfiguration, TorchDynamoPlugin,
                               parse_flag_from_env)

from common.config_checks import cuda_graphs_with_accumulation
from common.errors import UserError


def on_cpu() -> bool:
    """Whether this process computes on the CPU: no CUDA device, or `accelerate launch --cpu` (which sets
    ACCELERATE_USE_CPU). accelerate's Accelerator honours that flag on its own, so precision, TF32 and the
    device of work without an Accelerator must follow it too, or a CPU run would autocast."""
    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def check_a_gpu_per_process() -> None:
    """accelerate gives local process k the GPU cuda:k: more processes on a machine than it has GPUs (say
    `--num_processes 4` copied onto a one-GPU machine) would stop with CUDA's bare "invalid device ordinal"."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    gpus = 0 if on_cpu() else torch.cuda.device_count()
    if gpus and local_rank >= gpus:
        raise UserError(f"accelerate launch started process {local_rank} on this machine, which has {gpus} GPU(s), one "
                        f"per process: launch with --num_processes {gpus} (or fewer), or add --cpu to train on the CPU")


def fits_on(device: torch.device, nbytes: int, share: float = 0.25) -> bool:
    """Whether `nbytes` fit in `share` of the memory `device` has free (GPU memory, or the machine's RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return nbytes <= share * free


def refuse_multi_process(command: str) -> None:
    """`command` samples and writes in one process. Under `accelerate launch --num_processes N` (or torchrun,
    which set WORLD_SIZE) every process would repeat the same work into the same files and race on them."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UserError(f"{command} runs in one process, but this launch started {world} (WORLD_SIZE={world}, from "
                        f"accelerate launch --num_processes {world} or torchrun); run {command} without accelerate "
                        f"launch, or with --num_processes 1")


SHARDING = {  # what accelerate launch sets for the ways of training that shard a model across processes
    "ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "a parallelism config (tensor, context or sharded data parallel)",
}


def check_launcher(stage: str, compile_setting: str, grad_accum: int) -> None:
    """Refuse, before anything is written, what `accelerate launch` / `accelerate config` may set that a stage
    cannot train with:
    - more processes on a machine than it has GPUs (`check_a_gpu_per_process`);
    - FSDP, DeepSpeed, Megatron-LM or a parallelism config, which shard each model across processes, where the
      EMA copies, resume states and exported pipeline read it whole (these models fit on every GPU);
    - accelerate's own gradient accumulation (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, from `accelerate launch
      --gradient_accumulation_steps` or a DeepSpeed config): the stages accumulate their own micro-batches
      (`<stage>.grad_accum`), and accelerate would divide every loss by it once more, silently shrinking the
      gradients while the effective batch stayed the same;
    - the launcher's CUDA graphs (dynamo mode reduce-overhead, or backend cudagraphs, which `compile: auto`
      takes) with several micro-batches; the config's own `compile: reduce-overhead` is refused with them when
      the config loads."""
    check_a_gpu_per_process()
    for flag, name in SHARDING.items():
        if parse_flag_from_env(flag):
            raise UserError(f"{stage}: accelerate launch runs this stage with {name} ({flag}=true, from accelerate "
                            f"config), which shards each model's weights across processes; this toolkit's EMA, "
                            f"checkpoints and exported pipeline read them whole. Its models fit on every GPU: run "
                            f"`accelerate config` again choosing multi-GPU without {name}, or launch with --multi_gpu")
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").strip() or "1"
    if steps != "1":
        raise UserError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={steps} (from accelerate launch "
                        f"--gradient_accumulation_steps or accelerate config) is not how this toolkit accumulates: "
                        f"unset it and set {stage}.grad_accum={steps} instead")
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    mode = os.environ.get("ACCELERATE_DYNAMO_MODE", "default")
    if compile_setting == "auto" and grad_accum > 1 and (backend == "cudagraphs" or backend != "no" and mode == "reduce-overhead"):
        launcher = "backend cudagraphs" if backend == "cudagraphs" else "mode reduce-overhead"
        raise UserError(cuda_graphs_with_accumulation(stage, f"accelerate launch's dynamo {launcher} (taken by "
                                                             f"{stage}.compile=auto)", grad_accum))


def resolve_mixed_precision(setting: str, key: str = "mixed_precision") -> str:
    """The precision a stage trains in: never mixed on CPU (bf16/fp16 matmuls are very slow there);
    on CUDA an explicit config value wins, and `auto` defers to `accelerate launch --mixed_precision` /
    `accelerate config` (the ACCELERATE_MIXED_PRECISION they set), else bf16 (fp16 on older GPUs)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() or None
    main = os.environ.get("RANK", "0") == "0"  # no Accelerator yet: one note per launch, not one per process
    if on_cpu():
        if main and (setting in ("fp16", "bf16") or launcher in ("fp16", "bf16", "fp8")):
            asked = f"{key}={setting}" if setting in ("fp16", "bf16") else f"the launcher's mixed precision {launcher}"
            why = "no CUDA device" if not torch.cuda.is_available() else "accelerate launch --cpu"
            print(f"note: {asked} ignored: {why}, training in fp32 on the CPU")
        return "no"
    if setting == "auto" and launcher not in (None, "no", "fp16", "bf16"):  # fp8: accelerate's TransformerEngine/torchao
        raise UserError(f"{key}=auto takes the launcher's mixed precision, {launcher} (accelerate launch --mixed_precision "
                        f"or accelerate config), which this toolkit does not train in; set {key}=bf16 (or fp16, no) to "
                        f"override it, or launch with --mixed_precision bf16")
    if setting == "auto":
        return launcher or ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if main and launcher and launcher != setting:
        print(f"note: {key}={setting} from the config overrides the launcher's mixed precision {launcher}")
    return setting


def stage_setup(accelerator: Accelerator, global_batch: int) -> dict[str, str | int | bool]:
    """What a stage runs with where its config says `auto`, or asks for what a CPU does not do (bf16 there runs
    in fp32): the log, the checkpoints and the trackers record it, since config.yaml keeps what was asked."""
    plugin = accelerator.state.dynamo_plugin
    compiled = plugin is not None and plugin.backend != DynamoBackend.NO
    return {"mixed_precision": accelerator.mixed_precision, "compiled": compiled, "device": accelerator.device.type,
            "processes": accelerator.num_processes, "effective_batch": global_batch}


def precision_change(trained_in: str | None, now: str) -> str:
    """A resume's note when its checkpoint trained in another precision (a GPU's bf16 run resumed on a CPU,
    or `auto` under another launcher); empty when the same, or unrecorded (older checkpoints)."""
    if trained_in in (None, now):
        return ""
    return f" (trained in mixed precision {trained_in} so far, continuing in {now})"


def resolve_trackers(setting: str, key: str = "report_to") -> list[str]:
    """The experiment trackers a stage logs to: `auto` is TensorBoard when it is installed, `none` is
    none; named ones must be installed (checked here, before the stage writes anything)."""
    available = {str(t) for t in get_available_trackers()}
    names = [name.strip() for name in setting.split(",")]
    if names == ["auto"]:
        return ["tensorboard"] if "tensorboard" in available else []
    if names == ["none"]:
        return []
    if names == ["all"]:
        return sorted(available)
    missing = [name for name in names if name not in available]
    if missing:
        raise UserError(f"config key '{key}' asks for {', '.join(missing)}, which is not installed: "
                        f"pip install {' '.join(missing)}, or set {key}=none (or auto: TensorBoard when installed)")
    return names


def make_accelerator(mixed_precision: str = "no", compile_mode: str = "auto", trackers: list[str] | None = None,
                     logging_dir: str | os.PathLike | None = None, deterministic: bool = False) -> Accelerator:
    """An Accelerator in `mixed_precision` (already resolved), on CUDA when there is a GPU; otherwise the
    CPU, where several processes started by `accelerate launch --multi_gpu` / torchrun train over gloo.

    accelerate keeps one process-wide state that refuses a second precision or compile setting; stages
    that run one after another in one process (a notebook, the tests) may each want their own, so
    that state is reset here. The process group (accelerate's PartialState) is kept. An earlier
    stage's Accelerator reads the shared state too, so build each stage's when the stage starts.
    `trackers` (see `resolve_trackers`) log under `logging_dir` once `init_trackers` is called.
    `deterministic` (the config's) chooses deterministic kernels for this stage, or the fastest ones.
    """
    dynamo = None if compile_mode == "auto" else TorchDynamoPlugin(
        backend="no" if compile_mode == "no" else "inductor", mode=None if compile_mode == "no" else compile_mode)
    if AcceleratorState._shared_state:  # a stage before this one in the same process: start fresh
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    allow_tf32()
    use_deterministic_kernels(deterministic)
    project = ProjectConfiguration(project_dir=str(logging_dir), logging_dir=str(logging_dir)) if logging_dir else None
    # accumulation is the stages' own (no_sync, loss / grad_accum): accelerate's must stay 1, whatever the env says
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpu(),
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
                       step_scheduler_with_optimizer=False, dynamo_plugin=dynamo, log_with=trackers or None,
                       project_config=project)


def use_deterministic_kernels(enabled: bool) -> None:
    """Deterministic kernels or the fastest ones, set per stage (the flags are process-wide, so a stage after a
    deterministic one in the same process is not slowed). On a GPU, atomic adds (cuDNN's convolution backward
    algorithms, index and embedding backward) sum in a different order each run, so two runs of one seed
    drift apart; deterministic ones make them repeat bit for bit, at some cost in speed. A CPU's kernels
    already repeat.

    Strict, as accelerate's `set_seed(deterministic=True)` is: `warn_only=True` is not a gentler version of
    it, since the flash and memory-efficient attention backward read that flag and then take their
    non-deterministic path. An op with no deterministic kernel stops the stage instead (see
    `deterministic_refusal`); none of this project's training steps uses one (tests/test_devices.py)."""
    if enabled:  # cuBLAS reads this when the process makes its first handle: set it before any CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:  # benchmark mode picks the fastest algorithm per run, so runs could differ
        torch.backends.cudnn.benchmark = False


def deterministic_refusal(error: RuntimeError) -> UserError | None:
    """torch's refusal of a kernel under deterministic=true, as an error naming the config key and the fix;
    None for any other error."""
    message = str(error)
    op = re.match(r"(\S+) does not have a deterministic implementation, but you set", message)
    if op:
        return UserError(f"deterministic=true: {op[1]} has no deterministic kernel on this device, so this stage "
                         f"cannot repeat bit for bit; set deterministic=false (--set deterministic=false) to train "
                         f"with the fastest kernels")
    if "CUBLAS_WORKSPACE_CONFIG" in message and "Deterministic behavior was enabled" in message:
        return UserError(f"deterministic=true: cuBLAS repeats only with CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) "
                         f"in the environment, but it is {os.environ.get('CUBLAS_WORKSPACE_CONFIG')!r}; unset it or "
                         f"set it to :4096:8, or set deterministic=false")
    return None


def allow_tf32() -> None:
    """TF32 matmuls and convolutions on CUDA (fp32's range, a 10-bit mantissa, several times the speed): training,
    encoding and sampling do not need fp32's last bits. Every command sets it; torch leaves matmuls in fp32."""
    if not on_cpu():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def process_state() -> PartialState:
    """Rank, world size and device for work that trains nothing (encoding): no Accelerator, no precision;
    TF32 on a GPU."""
    check_a_gpu_per_process()
    allow_tf32()
    return PartialState(cpu=on_cpu())
