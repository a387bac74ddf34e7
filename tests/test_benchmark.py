"""benchmarks/benchmark.py: what it derives from its measurements, and its train-ldm measurement on the tiny config."""

import json
import sys

import pytest
import torch

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402
import measurements  # noqa: E402


def test_ratios_take_each_model_at_its_best_batch_and_skip_batches_out_of_memory():
    bare = {"peak_mb": 1.0, "unet_params_m": 1.5, "first_step_s": 0.1, "batch_assembly_share": 0.01}
    r = {"matmul_peak_gflops": 100.0,
         "ldm_command": {"8": {"batch": 8, "images_per_s": 80.0, "seconds_per_step": 0.1, "first_step_s": 2.0, "peak_mb": 1.0},
                         "16": {"batch": 16, "out_of_memory": True}},
         "ldm_bare": {"8": {"batch": 8, "images_per_s": 100.0, "seconds_per_step": 0.08, "gflop_per_step": 4.0, **bare},
                      "16": {"batch": 16, "images_per_s": 150.0, "seconds_per_step": 16 / 150, "gflop_per_step": 8.0, **bare}},
         "peer_train": {"8": {"batch": 8, "images_per_s": 4.0, "peak_mb": 9.0, "params_m": 77.4},
                        "16": {"batch": 16, "images_per_s": 5.0, "peak_mb": 9.0, "params_m": 77.4}},
         "sampling": {"4": {"batch": 4, "ms_per_image": 2.0, "peak_mb": 1.0}, "64": {"batch": 64, "ms_per_image": 1.0, "peak_mb": 1.0}},
         "peer_sampling": {"4": {"batch": 4, "ms_per_image": 50.0, "peak_mb": 1.0, "measured_steps": 3},
                           "64": {"batch": 64, "out_of_memory": True}}}
    benchmark.derive(r)
    command, bare = r["ldm_command"]["8"], r["ldm_bare"]["8"]
    assert command["share_of_bare_loop"] == pytest.approx(0.8)
    assert (command["mfu"], bare["mfu"]) == (pytest.approx(4.0 / 0.1 / 100), pytest.approx(4.0 / 0.08 / 100))
    assert "mfu" not in r["ldm_bare"]["16"]  # the command did not fit at 16, so there is nothing to compare
    assert r["best"] == {"ldm_command": {"batch": 8, "images_per_s": 80.0}, "ldm_bare": {"batch": 16, "images_per_s": 150.0},
                         "peer_train": {"batch": 16, "images_per_s": 5.0}, "sampling": {"batch": 64, "ms_per_image": 1.0},
                         "peer_sampling": {"batch": 4, "ms_per_image": 50.0}}
    assert r["ratios"] == {"train_images_per_s_ldm_over_peer": pytest.approx(16.0),
                           "train_images_per_s_bare_over_peer": pytest.approx(30.0),
                           "sampling_cost_peer_over_ldm": pytest.approx(50.0)}
    table = benchmark.table({**r, "machine": "m", "torch": "t", "device": "cpu", "precision": "no", "compile": "no",
                             "vae_train": {"batch": 1, "images_per_s": 1.0, "peak_mb": 1.0},
                             "encode": {"batch": 1, "images_per_s": 1.0, "peak_mb": 1.0},
                             "ldm_options": {"as used": {"batch": 8, "images_per_s": 100.0}}, "benchmark_seconds": 1.0})
    lines = table.splitlines()
    assert "| train-ldm (the command) | 8 | 80 img/s | 1 MB | first step 2.0 s; 80% of the bare loop, MFU 40.0% |" in lines
    assert "| train-ldm (the command) | 16 | out of memory | — |  |" in lines
    assert "| peer sampling | 64 | out of memory | — | 20 steps, CFG |" in lines
    assert "- train-ldm vs peer, training images/s: 16.0x (batch 8 vs 16); the bare loop 30.0x" in lines


def test_the_table_reports_train_ldm_variants_out_of_memory():
    """ldm_options runs every variant in one process, twice the config's batch included: on a smaller GPU it is one
    out-of-memory result, which the table says (the results file was written before the table)."""
    oom = {"out_of_memory": True, "batch": None}
    r = {"machine": "m", "torch": "t", "device": "cuda", "precision": "bf16", "compile": "no", "matmul_peak_gflops": 1.0,
         "vae_train": {"batch": 1, "images_per_s": 1.0, "peak_mb": 1.0}, "encode": {"batch": 1, "images_per_s": 1.0, "peak_mb": 1.0},
         "ldm_command": {}, "sampling": {}, "ldm_options": oom, "benchmark_seconds": 1.0}
    assert benchmark.table(r).splitlines()[-5:] == [
        "train-ldm speed-ups, one changed at a time (bare loop):", "",
        "out of memory (they run at the config's ldm.batch_size, half and twice it)", "", "(benchmark took 1 s)"]


def test_a_measurement_that_runs_out_of_memory_is_reported_not_a_failure(monkeypatch, capsys):
    def too_large(config, device, options):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(benchmark.MEASUREMENTS, "peer_train", too_large)
    benchmark.main(["--config", str(TINY), "--only", "peer_train", "--options", json.dumps({"batch": 4096})])
    assert capsys.readouterr().out.splitlines()[-1] == benchmark.RESULT + '{"out_of_memory": true, "batch": 4096}'


def test_each_device_and_compile_mode_has_its_own_results_file_by_default(monkeypatch):
    """A GPU run, or a compiled one, without --out does not write over the CPU's eager results that BENCHMARKS.md quotes."""
    asked = []

    def stop_at_the_out_check(path, *rest):
        asked.append(path)
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "writable_file", stop_at_the_out_check)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # as --device cpu sets it on a CUDA machine: undone after the test
    for flags in ([], ["--compile", "max-autotune"]):
        with pytest.raises(SystemExit):
            benchmark.main(["--device", "cpu", *flags])
    assert asked == ["benchmarks/results.json", "benchmarks/results-compile-max-autotune.json"]
    assert benchmark.default_out("cuda", "no") == "benchmarks/results-cuda.json"


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-sizes", "256,x", "argument --batch-sizes: expected whole numbers separated by commas, e.g. 256,1024 (got '256,x')"),
    ("--sample-batch-sizes", "0", "argument --sample-batch-sizes: batch sizes must be at least 1 (got '0')"),
    ("--batch-sizes", "4,8,4", "argument --batch-sizes: each batch size once (got '4,8,4')"),
    ("--command-steps", "0", "--command-steps must be at least 1 (got 0)")])
def test_bad_benchmark_flags_are_one_line_before_measuring(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main([flag, value, "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].partition(": error: ")[2] == message


def test_a_config_whose_dataset_is_missing_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    import yaml

    settings = yaml.safe_load(TINY.read_text())
    settings["data"] = {"name": "", "path": str(tmp_path / "missing"), "image_size": 16, "channels": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda *a: pytest.fail("measured before checking the data"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].partition(": error: ")[2] == (
        f"dataset folder '{tmp_path / 'missing'}' does not exist; check data.path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_config_that_starts_from_a_trained_model_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    """configs/mnist-finetune.yaml: the UNet's architecture comes from ldm.init_from, not from its ldm settings, so the
    bare loop would time another UNet than train-ldm trains."""
    monkeypatch.setattr(benchmark, "list_dataset", lambda data: None)  # its my_digits folder is the user's
    monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda *a: pytest.fail("measured a fine-tuning config"))
    config = ROOT / "configs" / "mnist-finetune.yaml"
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--config", str(config), "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].partition(": error: ")[2] == (
        f"--config {config} sets vae.init_from=checkpoints/mnist, but the benchmark builds the config's own models at "
        f"random from its settings; benchmark the config that trained checkpoints/mnist instead, or leave "
        f"vae.init_from out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_benchmark_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cuda", "--out", str(tmp_path / "r.json")])
    assert capsys.readouterr().err.splitlines()[-1].partition(": error: ")[2] == (
        f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; leave --device out to measure on the CPU")


def test_the_train_ldm_command_is_timed_from_its_own_log(tmp_path):
    """prepare_run makes a run folder with the real stage-one commands; ldm_command trains the real train-ldm on
    it for 2 + 2 steps and reads its speed between the log records at steps 2 and 4, whatever step budget the
    config's train-ldm has (an epoch limit would stop it first), one micro-batch a step as its bare loop takes."""
    import yaml

    from common.config_yaml import load_config

    settings = yaml.safe_load(TINY.read_text())
    settings["ldm"].update(epochs=0.05, grad_accum=2)  # 160 images at batch 4 x 2: 1 step
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    options = {"workdir": str(tmp_path), "config_path": str(config_path), "batch": 4, "command_steps": 2,
               "compile": "no", "precision": "no", "repeats": 1}
    config, device = load_config(config_path), torch.device("cpu")
    assert measurements.prepare_run(config, device, options)["run"] == str(tmp_path / "stage-one")
    result = measurements.ldm_command(config, device, options)
    records = [json.loads(line) for line in (tmp_path / "ldm-batch4" / "logs" / "ldm.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "loss" in r}
    assert sorted(times) == [2, 4]
    assert result["seconds_per_step"] == pytest.approx((times[4] - times[2]) / 2)
    assert result["images_per_s"] == pytest.approx(4 / result["seconds_per_step"])
    assert (result["batch"], result["timed_steps"], result["mixed_precision"], result["compiled"]) == (4, 2, "no", False)
    setup = next(r for r in records if r.get("event") == "setup")
    assert setup["effective_batch"] == 4  # images per step: the batch images/s counts


def test_train_ldm_variants_at_batch_one_leave_out_half_the_batch(tmp_path):
    from conftest import tiny_config

    config = tiny_config(tmp_path / "run", "ldm.batch_size=1")
    results = measurements.ldm_options(config, torch.device("cpu"), {"repeats": 1, "precision": "no"})
    assert list(results) == ["as used", "foreach AdamW instead of fused", "channels_last", "attention without SDPA",
                             "twice the batch"]
    assert (results["as used"]["batch"], results["twice the batch"]["batch"]) == (1, 2)
    assert all(r["images_per_s"] > 0 for r in results.values())


@pytest.mark.parametrize("disc_start, objective", [(2, "L1 + KL + PatchGAN"), (-1, "L1 + KL")])
def test_vae_training_is_timed_with_the_configs_objective(tmp_path, monkeypatch, disc_start, objective):
    """configs/tiny.yaml (and flowers) train the VAE with the PatchGAN from vae.disc_start: its step is timed with it."""
    from conftest import tiny_config

    monkeypatch.setattr("vae.model.lpips_backbone_available", lambda net: False)
    config = tiny_config(tmp_path / "run", f"vae.disc_start={disc_start}")
    result = measurements.vae_train(config, torch.device("cpu"), {"repeats": 1, "precision": "no"})
    assert (result["objective"], result["batch"]) == (objective, 8) and result["images_per_s"] > 0
