"""How fast is each stage, how close does train-ldm come to a bare loop, and how much cheaper is latent
diffusion than the pixel-space model it replaces?

    python benchmarks/benchmark.py [--config configs/mnist.yaml] [--device cuda] [--batch-sizes 1024,4096,16384]
                                   [--compile max-autotune] [--out FILE]

Measures, on this machine, for the config's models (randomly initialised: speed does not depend on
the weights), in the precision train-ldm resolves for this device (bf16 on a GPU, fp32 on a CPU):
- VAE training images/s and encode-dataset images/s at the config's batch sizes;
- at each batch size: the `train-ldm` command itself (its Trainer, EMA, schedule, logging and
  device-resident data, on a run folder prepared with two steps of each stage-one command), the
  **bare loop** of the same UNet at the same batch, precision and compile mode (its ceiling), and
  the pixel-space peer's training step;
- sampling milliseconds per image (20 DPM-Solver++ steps, classifier-free guidance, text encoding
  and VAE decode included) for ours and the peer at each sampling batch;
- the ratios, each model at its best batch: train-ldm over the peer (images/s), the peer's sampling
  cost over ours, train-ldm over its bare loop, and model FLOPs utilisation against a matmul peak
  measured here in the same precision.

The peer is the pixel-space DDPM of the Devanagari report (diffusers UNet2DModel, 32x32x1, channels
128-128-256-256-512-512, attention in the fifth down and second up block, class conditioning).
Each measurement runs in a fresh process, so its peak memory (CUDA's allocator peak, or the CPU
process's peak resident set) is its own, and a batch that does not fit is reported as such.
Training and sampling are timed over a few steps after warm-up, the best of a few rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.checkpoint import writable_file  # noqa: E402
from common.config import ConfigError  # noqa: E402
from common.config_yaml import load_config  # noqa: E402
from common.data import list_dataset  # noqa: E402
from common.devices import resolve_mixed_precision  # noqa: E402
from common.errors import UserError  # noqa: E402
from measurements import MEASUREMENTS, SAMPLE_STEPS, matmul_peak_gflops, out_of_memory  # noqa: E402

RESULT = "benchmark-result: "
COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")
# per device: training batch sizes (None: the config's ldm.batch_size), sampling batch sizes, train-ldm's timed steps.
# On a GPU up to 16,384: issue 14's profile found this UNet's bare step as long at 4,096 as at 1,024 (bound by the
# host launching kernels, not by the GPU), so its best batch lies beyond 4,096; a batch that does not fit (the
# peer's, first) is reported as out of memory.
DEFAULTS = {"cpu": (None, [64], 30), "cuda": ([1024, 4096, 16384], [64, 1024, 4096], 200)}


def batch_sizes(text: str) -> list[int]:
    """'256,1024' -> [256, 1024] (argparse type: a bad list is one line naming the flag)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, e.g. 256,1024 (got {text!r})")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1 (got {text!r})")
    if len(set(sizes)) < len(sizes):  # one result per size, and train-ldm's run folder is named by its batch
        raise argparse.ArgumentTypeError(f"each batch size once (got {text!r})")
    return sizes


def default_out(device_type: str, compile_mode: str) -> str:
    """One results file per device and compile mode, so that measuring a GPU, or compiling, never writes over
    the CPU's eager results that BENCHMARKS.md quotes."""
    device = "" if device_type == "cpu" else f"-{device_type}"
    compiled = "" if compile_mode == "no" else f"-compile-{compile_mode}"
    return f"benchmarks/results{device}{compiled}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--out", help="where the results go (default: benchmarks/results.json on a CPU, "
                                      "results-cuda.json on a GPU, with -compile-MODE added when compiling)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--batch-sizes", type=batch_sizes,
                        help="training batch sizes to measure (default: the config's ldm.batch_size on a CPU, 1024,4096,16384 on a GPU)")
    parser.add_argument("--sample-batch-sizes", type=batch_sizes, help="sampling batch sizes (default: 64; 64,1024,4096 on a GPU)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="no",
                        help="torch.compile mode of train-ldm, its bare loop and the peer (compile time is reported)")
    parser.add_argument("--command-steps", type=int, help="train-ldm steps timed after as many warm-up steps (default: 30; 200 on a GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)  # one measurement, as JSON
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:  # else each measurement divides by zero, in its child process, after the matmul peak
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    if args.command_steps is not None and args.command_steps < 1:
        parser.error(f"--command-steps must be at least 1 (got {args.command_steps})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; leave --device out to "
                     f"measure on the CPU")
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = args.out or default_out(device_type, args.compile)
    if device_type == "cpu" and torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the commands (and this script's children) then stay on the CPU
    try:
        config = load_config(args.config)
        if not args.only:  # the results are written after minutes of measuring: a path that cannot take them fails now
            writable_file(args.out, "--out", "results.json")
            list_dataset(config.data)  # prepare_run trains on it, after the first measurements: a missing one fails now
        for key, value in [("vae.init_from", config.vae.init_from), ("clip.init_from", config.clip.init_from),
                           ("text_encoder.pretrained", config.text_encoder.pretrained), ("ldm.init_from", config.ldm.init_from)]:
            if value:  # the trained model's architecture, not the config's, is what its command would run
                raise UserError(f"--config {args.config} sets {key}={value}, but the benchmark builds the config's own "
                                f"models at random from its settings; benchmark the config that trained {value} instead, "
                                f"or leave {key} out")
    except (ConfigError, UserError) as error:  # one line, as the commands say it, not a traceback
        parser.error(str(error))
    device = torch.device(device_type)
    if device.type == "cuda":  # as the commands set it (common/devices.py make_accelerator)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    if args.only:
        try:
            result = MEASUREMENTS[args.only](config, device, json.loads(args.options))
        except Exception as error:  # a batch too large for this device is a result, not a failure
            if not out_of_memory(error):
                raise
            result = {"out_of_memory": True, "batch": json.loads(args.options).get("batch")}
        print(RESULT + json.dumps(result))
        return

    default_batches, default_sample_batches, default_steps = DEFAULTS[device.type]
    precision = resolve_mixed_precision(config.ldm.mixed_precision, "ldm.mixed_precision")
    options = {"repeats": args.repeats, "precision": precision, "compile": args.compile, "config_path": args.config,
               "command_steps": args.command_steps or default_steps}
    started = time.time()
    results: dict = {"machine": describe_machine(device), "device": device.type, "torch": torch.__version__,
                     "config": args.config, "precision": precision, "compile": args.compile,
                     "matmul_peak_gflops": matmul_peak_gflops(device, precision)}
    with tempfile.TemporaryDirectory() as workdir:
        def measure(name: str, **extra) -> dict:
            """One measurement in a fresh process (its own peak memory; nothing left over from the last)."""
            print(f"[benchmark] {name} {' '.join(f'{k} {v}' for k, v in extra.items())}", flush=True)
            child = subprocess.run([sys.executable, __file__, "--config", args.config, "--device", device.type,
                                    "--only", name, "--options", json.dumps({**options, "workdir": workdir, **extra})],
                                   capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT)]
            if child.returncode != 0 or not lines:
                raise SystemExit(f"{name} failed:\n{child.stdout[-2000:]}{child.stderr[-3000:]}")
            return json.loads(lines[-1][len(RESULT):])

        results["vae_train"], results["encode"] = measure("vae_train"), measure("encode")
        measure("prepare_run")
        for name in ("ldm_command", "ldm_bare", "peer_train"):
            results[name] = {str(b): measure(name, batch=b) for b in args.batch_sizes or default_batches or [config.ldm.batch_size]}
        results["ldm_options"] = measure("ldm_options")
        for name in ("sampling", "peer_sampling"):
            results[name] = {str(b): measure(name, batch=b) for b in args.sample_batch_sizes or default_sample_batches}
    derive(results)
    results["benchmark_seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def fitted(measured: dict) -> dict:
    """The batch sizes that ran (not out of memory)."""
    return {batch: r for batch, r in measured.items() if not r.get("out_of_memory")}


def derive(r: dict) -> None:
    """Per batch: train-ldm's share of its bare loop and the MFU of both; then each model at its best batch."""
    for batch, command in fitted(r["ldm_command"]).items():
        bare = r["ldm_bare"][batch]
        if bare.get("out_of_memory"):
            continue
        command["share_of_bare_loop"] = command["images_per_s"] / bare["images_per_s"]
        for measured in (command, bare):
            measured["mfu"] = bare["gflop_per_step"] / measured["seconds_per_step"] / r["matmul_peak_gflops"]
    best = {name: max(fitted(r[name]).values(), key=lambda m: m["images_per_s"], default=None)
            for name in ("ldm_command", "ldm_bare", "peer_train")}
    cheapest = {name: min(fitted(r[name]).values(), key=lambda m: m["ms_per_image"], default=None)
                for name in ("sampling", "peer_sampling")}
    r["best"] = {name: {"batch": m["batch"], **{k: m[k] for k in ("images_per_s", "ms_per_image") if k in m}}
                 for name, m in {**best, **cheapest}.items() if m is not None}
    if None not in best.values() and None not in cheapest.values():
        r["ratios"] = {
            "train_images_per_s_ldm_over_peer": best["ldm_command"]["images_per_s"] / best["peer_train"]["images_per_s"],
            "train_images_per_s_bare_over_peer": best["ldm_bare"]["images_per_s"] / best["peer_train"]["images_per_s"],
            "sampling_cost_peer_over_ldm": cheapest["peer_sampling"]["ms_per_image"] / cheapest["sampling"]["ms_per_image"],
        }


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def speed(m: dict, unit: str = "img/s") -> str:
    if m.get("out_of_memory"):
        return "out of memory"
    return f"{m['images_per_s']:.0f} img/s" if unit == "img/s" else f"{m['ms_per_image']:.2f} ms/img"


def memory(m: dict) -> str:
    return "—" if m.get("out_of_memory") else f"{m['peak_mb']:.0f} MB"


def table(r: dict) -> str:
    lines = [f"machine: {r['machine']} (torch {r['torch']}, {r['device']}, precision {r['precision']}, "
             f"compile {r['compile']}); {r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak in that precision", "",
             "| measurement | batch | speed | peak memory | notes |", "| --- | --- | --- | --- | --- |",
             f"| VAE training | {r['vae_train']['batch']} | {speed(r['vae_train'])} | {memory(r['vae_train'])} | "
             f"{r['vae_train'].get('objective', '')} |",
             f"| encode-dataset | {r['encode']['batch']} | {speed(r['encode'])} | {memory(r['encode'])} | |"]
    for batch, command in r["ldm_command"].items():
        bare, peer = r["ldm_bare"][batch], r["peer_train"][batch]
        notes = "" if command.get("out_of_memory") else (
            f"first step {command['first_step_s']:.1f} s"
            + (f"; {100 * command['share_of_bare_loop']:.0f}% of the bare loop, MFU {100 * command['mfu']:.1f}%"
               if "share_of_bare_loop" in command else ""))
        lines.append(f"| train-ldm (the command) | {batch} | {speed(command)} | {memory(command)} | {notes} |")
        if not bare.get("out_of_memory"):
            lines.append(f"| train-ldm bare loop (ceiling) | {batch} | {speed(bare)} | {memory(bare)} | "
                         f"{bare['unet_params_m']:.2f}M params, {bare['gflop_per_step']:.1f} GFLOP/step, first step "
                         f"{bare['first_step_s']:.1f} s, batch assembly {100 * bare['batch_assembly_share']:.1f}% of a step"
                         + (f", MFU {100 * bare['mfu']:.1f}%" if "mfu" in bare else "") + " |")
        lines.append(f"| peer training | {batch} | {speed(peer)} | {memory(peer)} | "
                     + (f"{peer['params_m']:.1f}M params" if "params_m" in peer else "") + " |")
    for batch, ours in r["sampling"].items():
        peer = r["peer_sampling"][batch]
        lines.append(f"| sampling | {batch} | {speed(ours, 'ms')} | {memory(ours)} | "
                     f"{SAMPLE_STEPS} DPM-Solver++ steps, CFG, incl. text encoding and VAE decode |")
        lines.append(f"| peer sampling | {batch} | {speed(peer, 'ms')} | {memory(peer)} | {SAMPLE_STEPS} steps, CFG"
                     + ("" if peer.get("out_of_memory") else f" ({peer['measured_steps']} steps timed)") + " |")
    if "ratios" in r:
        best, ratios = r["best"], r["ratios"]
        lines += ["", "Each at its best batch:",
                  f"- train-ldm vs peer, training images/s: {ratios['train_images_per_s_ldm_over_peer']:.1f}x "
                  f"(batch {best['ldm_command']['batch']} vs {best['peer_train']['batch']}); the bare loop "
                  f"{ratios['train_images_per_s_bare_over_peer']:.1f}x",
                  f"- peer vs latent sampling cost per image: {ratios['sampling_cost_peer_over_ldm']:.1f}x "
                  f"(batch {best['sampling']['batch']} vs {best['peer_sampling']['batch']})"]
    lines += ["", "train-ldm speed-ups, one changed at a time (bare loop):", ""]
    if r["ldm_options"].get("out_of_memory"):  # all of them in one process, up to twice the config's ldm.batch_size
        lines.append("out of memory (they run at the config's ldm.batch_size, half and twice it)")
    else:
        base = r["ldm_options"]["as used"]["images_per_s"]
        lines += ["| variant | images/s | vs as used |", "| --- | --- | --- |"]
        lines += [f"| {name} (batch {v['batch']}) | {v['images_per_s']:.0f} | {v['images_per_s'] / base:.2f}x |"
                  for name, v in r["ldm_options"].items()]
    lines += ["", f"(benchmark took {r['benchmark_seconds']:.0f} s)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
