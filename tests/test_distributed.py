"""The same commands on 2 CPU processes through `accelerate launch` (gloo), as on a GPU cluster.

GPUs are hidden from these processes (CUDA_VISIBLE_DEVICES=""), so the tests run the same on a CPU
machine and on one with a single GPU (where 2 processes cannot share the device through NCCL).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common.data import ImageDataset
from conftest import ROOT, TINY, tiny_config
from ldm.latents import load_cache, vae_fingerprint


CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def launch(module: str, run, *overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    # on a machine without GPUs, --multi_gpu starts CPU processes that train together over gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", module, "--config", str(TINY), "--set", f"run_dir={run}"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=CPU_ONLY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def cache_of(run):
    dataset = ImageDataset(tiny_config(run).data, "all")
    return load_cache(run / "latents", vae_fingerprint(run / "vae"), dataset.fingerprint())


def test_two_processes_encode_the_same_cache_train_and_resume_on_one(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "latents")
    shutil.rmtree(run / "train_state" / "ldm")
    (run / "logs" / "ldm.jsonl").unlink()

    # encode-dataset on 2 processes: shard k by rank k mod 2, one manifest, the same latents
    launch("ldm.encode", run)
    single, double = cache_of(tiny_run), cache_of(run)
    everything = torch.arange(len(single))
    for a, b in zip(single.latents(everything), double.latents(everything)):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(single.labels, double.labels)
    assert len(list((run / "latents").glob("manifest*.json"))) == 1

    # train-ldm on 2 processes: rank 0 alone writes checkpoints, logs and samples
    result = launch("ldm.train", run, "ldm.max_steps=6", "ldm.save_every=2", "ldm.sample_every=100")
    assert "effective batch 8 per process x 2 processes x 1 accumulation = 16" in result.stdout
    log = [json.loads(line) for line in (run / "logs" / "ldm.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # one line per step, not one per process
    assert sorted(p.name for p in (run / "train_state" / "ldm").iterdir()) == \
        ["state-00000004.safetensors", "state-00000006.safetensors"]
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # the 2-process checkpoint resumes in 1 process (as if the run had died after step 4's checkpoint)
    (run / "train_state" / "ldm" / "state-00000006.safetensors").unlink()
    result = subprocess.run([sys.executable, "-m", "ldm.train", "--config", str(TINY), "--set", f"run_dir={run}",
                             "--set", "ldm.max_steps=6", "--set", "ldm.save_every=2", "--set", "ldm.sample_every=100"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=CPU_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4 (saved by 2 processes, resumed on 1)" in result.stdout
    log = [json.loads(line) for line in (run / "logs" / "ldm.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in log][-2:] == [5, 6]


def test_two_processes_train_the_vae_and_clip(tmp_path):
    run = tmp_path / "run"
    launch("ldm.train_clip", run, "clip.max_steps=2")
    launch("vae.train", run, "vae.max_steps=3", "vae.disc_start=1")
    assert (run / "text_encoder" / "model.safetensors").is_file()
    assert (run / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    log = [json.loads(line) for line in (run / "logs" / "vae.jsonl").read_text().splitlines() if '"rec"' in line]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_generate_and_evaluate_refuse_a_multi_process_launch(tiny_run, tmp_path, monkeypatch, capsys):
    """Under `accelerate launch --num_processes 2` every process would sample the same images into the same
    files (the second then found the first's and failed): refused, naming the fix, before anything is written."""
    from pipelines.evaluate import cli as evaluate_cli
    from pipelines.generate import cli as generate_cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for command, cli, argv in [("generate", generate_cli, ["--run", str(tiny_run), "Draw a six", "--out", str(tmp_path / "out")]),
                               ("evaluate", evaluate_cli, ["--run", str(tiny_run)])]:
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err == (
            f"error: {command} runs in one process, but this launch started 2 (WORLD_SIZE=2, from accelerate launch "
            f"--num_processes 2 or torchrun); run {command} without accelerate launch, or with --num_processes 1\n")
    assert not (tmp_path / "out").exists()
