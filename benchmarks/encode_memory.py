"""Does encode-dataset stream? Its peak memory at 5,000 images (MNIST) and at 92,000 (rendered Devanagari).

    python benchmarks/encode_memory.py [--out benchmarks/encode_memory.json]

Each dataset gets a throwaway run folder with the MNIST config's VAE (trained one step: speed and
memory do not depend on the weights), then `encode-dataset` runs in its own process and its peak
resident set (the kernel's ru_maxrss for that process) is read when it exits. The Devanagari glyphs
are rendered (and cached) before, so rendering is not counted; the rendered pixels themselves, which
the dataset holds as one uint8 array, are reported beside the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = {  # name: (overrides, images)
    "mnist 5,000": (["data.name=mnist"], 5000),
    "devanagari 92,000": (["data.name=devanagari", "data.per_class=2000"], 92000),
}


def run(module: str, config: str, overrides: list[str]) -> tuple[float, float]:
    """(peak resident MB, seconds) of `python -m module` in its own process."""
    command = [sys.executable, "-m", module, "--config", config]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{module} failed:\n{output[-3000:]}")
    return usage.ru_maxrss / 1024, time.time() - started  # Linux reports kilobytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.yaml", help="the VAE and encode settings")
    parser.add_argument("--out", default="benchmarks/encode_memory.json")
    args = parser.parse_args(argv)
    from common.checkpoint import writable_file
    from common.config import ConfigError
    from common.config_yaml import load_config
    from common.data.devanagari import render_dataset
    from common.errors import UserError

    try:  # before minutes of rendering: the children would find a bad config only after it, the results file at the end
        load_config(args.config)
        writable_file(args.out, "--out", "encode_memory.json")
    except (ConfigError, UserError) as error:
        parser.error(str(error))

    render_dataset(2000, 0)  # rendered once and cached, so encode-dataset only reads it
    results = {}
    for name, (overrides, images) in DATASETS.items():
        with tempfile.TemporaryDirectory() as folder:
            common = [f"run_dir={folder}/run", *overrides]
            run("vae.train", args.config, common + ["vae.max_steps=1", "vae.sample_every=1000", "vae.lpips=false"])
            peak_mb, seconds = run("ldm.encode", args.config, common)
            shards = sorted(Path(folder, "run", "latents").glob("shard-*.safetensors"))
            results[name] = {"images": images, "peak_rss_mb": peak_mb, "seconds": seconds,
                             "pixels_held_mb": images * 32 * 32 / 2**20 if "devanagari" in name else None,
                             "cache_mb": sum(p.stat().st_size for p in shards) / 2**20, "shards": len(shards)}
        print(f"{name}: peak {peak_mb:.0f} MB resident, {seconds:.0f} s, cache {results[name]['cache_mb']:.0f} MB "
              f"in {len(shards)} shard(s)", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
