"""The main job: every stage of a config, in order, with the wall time of each.

    python scripts/quickstart.py [configs/mnist.yaml] [--set key=value ...] [--sequential | --side-by-side]

Each stage is the same command a user runs (`train-clip`, `train-vae`, `encode-dataset`, `train-ldm`,
`evaluate`, `generate`), called in this process, so torch, diffusers and transformers are imported
once (~11 s per command on 2 CPU cores, a tenth of the 10-minute quickstart). On a machine without
CUDA, train-clip and train-vae, which need nothing from each other, run side by side, each on half
the cores (train-clip in a spawned process whose output goes to run/logs/train-clip.out): two
small models on one core each keep the cores busier than one after the other on both (measured on
2 cores: 1.4x the throughput). `--sequential` runs them one after the other instead. On a GPU they run
one after the other unless `--side-by-side` asks otherwise: two small models each launching their own
kernels may share one GPU better than one after the other, which has not been measured yet.

Reproducibility (checked on configs/tiny.yaml, every weight file hashed): a quickstart run again on
the same machine gives the same bits. `--sequential` gives the same bits as the separate commands;
side by side gives other bits than those, since one thread per stage sums in another order. The
overrides go to every command. Re-running it resumes: finished stages only re-export their results.
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # the imports below count in the total

import multiprocessing  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from common.checkpoint import writable_folder  # noqa: E402
from common.cli import build_parser, resolve_config  # noqa: E402
from common.config import ConfigError, DataConfig, dump_config  # noqa: E402
from common.data import list_dataset  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.run import RunFolder  # noqa: E402
from ldm.encode import cli as encode_dataset  # noqa: E402
from ldm.train import cli as train_ldm  # noqa: E402
from ldm.train_clip import cli as train_clip  # noqa: E402
from pipelines.evaluate import cli as evaluate  # noqa: E402
from pipelines.generate import cli as generate  # noqa: E402
from vae.train import cli as train_vae  # noqa: E402


def run_in_child(args: list[str], threads: int, log: str) -> None:
    """train-clip in a spawned process on `threads` threads, its output (progress bars included) to `log`."""
    torch.set_num_threads(threads)
    with open(log, "w", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        train_clip(args)


def stage_one_side_by_side(args: list[str], run_dir: str) -> tuple[float, float]:
    """train-clip (child process) and train-vae (here) at once, each on half the cores; their wall times."""
    threads = torch.get_num_threads()
    half = max(1, threads // 2)
    log = Path(run_dir) / "logs" / "train-clip.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    child = multiprocessing.get_context("spawn").Process(target=run_in_child, args=(args, half, str(log)))
    started = time.time()
    child.start()
    print(f"=== train-clip (side by side with train-vae, {half} thread(s) each; its output: {log})", flush=True)
    print("=== train-vae", flush=True)
    torch.set_num_threads(half)
    try:
        train_vae(args)
        vae_seconds = time.time() - started
        child.join()
    finally:
        torch.set_num_threads(threads)
        if child.is_alive():
            child.terminate()
    clip_seconds = time.time() - started
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    print("\n".join([line for line in lines if line.startswith("[clip]")][-3:]))
    if child.exitcode:  # say why here, as train-clip run on its own would, not only in its log
        errors = [line for line in lines if line.startswith("error: ")]
        print(f"{errors[-1] if errors else 'error: train-clip failed'} (train-clip's output: {log})", file=sys.stderr)
        sys.exit(child.exitcode if child.exitcode > 0 else 1)
    return clip_seconds, vae_seconds


def stage_one_side_by_side_wanted(sequential: bool, side_by_side: bool, cuda: bool, threads: int) -> bool:
    """Whether train-clip runs beside train-vae: on a CPU with 2+ threads unless --sequential; on a GPU only with
    --side-by-side (each process then launches its own kernels on the one GPU)."""
    if sequential:
        return False
    return side_by_side or (not cuda and threads >= 2)


def prompts_to_draw(data: DataConfig, count: int = 8) -> list[str]:
    """generate's prompts for the grid: every class, or for a caption dataset (metadata.jsonl, which has no classes for
    --all-classes) its first `count` held-out captions."""
    if data.name:  # the built-in datasets have classes (and listing one may load its images)
        return ["--all-classes"]
    listing = list_dataset(data)  # the folder's problems are the stages' own errors, here before any stage
    if listing.texts is None:
        return ["--all-classes"]
    held_out = [texts[0] for texts, holdout in zip(listing.texts, listing.holdout) if holdout]
    return list(dict.fromkeys(held_out))[:count]


def main(argv: list[str]) -> None:
    # the commands' own options (so --help tells them, and --set=k=v or --run DIR name the run as the commands read
    # them: the grid's folder is the run's), plus this script's CONFIG and --sequential or --side-by-side
    parser = build_parser(__doc__.strip().splitlines()[0], config_required=False,
                          example="python scripts/quickstart.py configs/mnist.yaml [--set key=value ...] "
                                  "[--sequential | --side-by-side]")
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="the config of every stage (default: configs/mnist.yaml)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--sequential", action="store_true", help="train-clip, then train-vae (else side by side on a CPU)")
    order.add_argument("--side-by-side", action="store_true", help="train-clip beside train-vae on a GPU too")
    args = parser.parse_args(argv)
    if args.config_file and args.config:
        parser.error(f"give the config once: {args.config_file} or --config {args.config}")
    args.config = args.config_file or args.config or "configs/mnist.yaml"
    common = ["--config", args.config, *(["--run", args.run] if args.run else []), *[f"--set={o}" for o in args.overrides]]
    try:
        config = resolve_config(args)
        if not args.dry_run:  # train-clip's log goes into run/logs/ before any stage has checked the run folder
            run = RunFolder(writable_folder(config.run_dir, "run_dir"))
            run.check_writable("train-clip", run.logs)
            drawn = prompts_to_draw(config.data)
    except (ConfigError, UserError) as error:  # as the commands do: one line and exit status 2, before any stage
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        print(dump_config(config))
        return
    run_dir = config.run_dir
    timings = [("imports", time.time() - PROCESS_STARTED)]
    if not stage_one_side_by_side_wanted(args.sequential, args.side_by_side, torch.cuda.is_available(),
                                         torch.get_num_threads()):
        stages = [("train-clip", train_clip, common), ("train-vae", train_vae, common)]
    else:
        clip_seconds, vae_seconds = stage_one_side_by_side(common, run_dir)
        timings += [("train-clip", clip_seconds), ("train-vae", vae_seconds),
                    ("  (together)", max(clip_seconds, vae_seconds))]
        stages = []
    stages += [("encode-dataset", encode_dataset, common), ("train-ldm", train_ldm, common),
               ("evaluate", evaluate, common),  # tunes the run's sampling defaults first
               ("generate", generate, [*common, "--num", "8", "--out", f"{run_dir}/samples/quickstart", *drawn, "--overwrite"])]
    for name, command, args in stages:
        print(f"=== {name}", flush=True)
        stage_started = time.time()
        command(args)
        timings.append((name, time.time() - stage_started))
    print("\n=== wall time per stage")
    for name, seconds in timings + [("total", time.time() - PROCESS_STARTED)]:
        print(f"{name:<16} {seconds:5.0f} s")
    print(f"\nGrid:    {run_dir}/samples/quickstart/grid.png\nMetrics: {run_dir}/eval.json")
    print(f"Use it:  python -c \"from pipelines import LatentPipeline; LatentPipeline.from_pretrained('{run_dir}')"
          f"('Draw a six').images[0].save('six.png')\"")


if __name__ == "__main__":
    main(sys.argv[1:])
