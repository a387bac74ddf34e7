import re
import subprocess
import sys

import pytest
import yaml

from common.config import Config, ConfigError, dump_config
from common.config_yaml import from_dict, load_config
from conftest import ROOT, TINY, tiny_config


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.run_dir == f"checkpoints/{path.stem}"


def test_overrides_are_typed(tmp_path):
    config = tiny_config(tmp_path, "vae.lr=3e-4", "vae.max_steps=7", "data.augment.hflip=true",
                         "ldm.block_out_channels=[32, 64]", "ldm.cross_attention=[true, true]",
                         "ldm.prediction_type=v_prediction")
    assert config.vae.lr == pytest.approx(3e-4) and isinstance(config.vae.lr, float)
    assert config.vae.max_steps == 7
    assert config.data.augment.hflip is True
    assert config.ldm.block_out_channels == [32, 64]
    assert config.ldm.prediction_type == "v_prediction"
    assert config.run_dir == str(tmp_path)


@pytest.mark.parametrize("override, key", [
    ("vae.learning_rate=1", "vae.learning_rate"),  # unknown key
    ("vae.max_steps=ten", "vae.max_steps"),  # wrong type
    ("vae.max_steps=1.5", "vae.max_steps"),  # a float is not an int
    ("data.augment.hflip=3", "data.augment.hflip"),  # not a bool
    ("ldm.beta_schedule=cosine", "ldm.beta_schedule"),  # not one of the choices
    ("vae.block_out_channels=[8, x]", "vae.block_out_channels[1]"),
    ("nonsense.key=1", "nonsense"),
])
def test_bad_keys_and_types_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}")):
        tiny_config(tmp_path, override)


def test_a_section_set_as_a_mapping_keeps_its_other_keys(tmp_path):
    """Before: `vae={max_steps: 3}` replaced the whole section, so tiny.yaml's VAE ([8, 16] channels, batch 8) silently
    became the default one ([32, 64, 64], batch 64)."""
    config = tiny_config(tmp_path, "vae={max_steps: 3, lr: 2e-3}", "data.augment={rotate_degrees: 3}")
    assert (config.vae.max_steps, config.vae.lr) == (3, pytest.approx(2e-3))
    assert config.vae.block_out_channels == [8, 16] and config.vae.batch_size == 8  # the rest as in tiny.yaml
    assert (config.data.augment.rotate_degrees, config.data.augment.translate, config.data.augment.scale) == (3, 0.05, 0.05)


def test_a_key_set_twice_with_two_values_is_refused(tmp_path):
    """Before: the last --set won without a word, where a config file with the key written twice is refused."""
    with pytest.raises(ConfigError, match=r"^--set vae.max_steps is given twice, as 3 and 5; keep the one you mean$"):
        tiny_config(tmp_path, "vae.max_steps=3", "vae.max_steps=5")
    assert tiny_config(tmp_path, "vae.max_steps=3", "vae.max_steps=3").vae.max_steps == 3  # the same value twice is fine


@pytest.mark.parametrize("override, key", [
    ("vae.max_steps=-1", "vae.max_steps"),
    ("ldm.cond_dropout=1.5", "ldm.cond_dropout"),
    ("data.image_size=17", "data.image_size"),  # not divisible by the VAE's factor 2
    ("data.channels=2", "data.channels"),
    ("ldm.cross_attention=[true]", "ldm.cross_attention"),
    ("sample.guidance_interval=[0.5, 0.5]", r"sample.guidance_interval' must be \[start, stop\] with 0 <= start < stop <= 1 "
                                             r"\(fractions of the sampling steps\), got \[0.5, 0.5\]"),
    ("evaluate.tune_guidance_intervals=[[0.0, 1.0], [0.2]]", r"evaluate.tune_guidance_intervals\[1\]' must be \[start"),
    ("evaluate.tune_guidance_intervals=[]", r"evaluate.tune_guidance_intervals' must be a non-empty list of \[start, "
                                            r"stop\] intervals, e.g. \[\[0.0, 1.0\]\] \(every step guided\), got \[\]"),
    ("evaluate.tune_guidance=[]", r"evaluate.tune_guidance' must be a non-empty list of numbers >= 0, got \[\]"),
    ("evaluate.tune_steps=[]", r"evaluate.tune_steps' must be a non-empty list of steps"),
    ("evaluate.tune_min_class=1.5", r"evaluate.tune_min_class' must be in \[0, 1\], got 1.5"),
])
def test_out_of_range_values_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config(tmp_path, override)


def test_cuda_graphs_with_gradient_accumulation_are_refused_on_load(tmp_path):
    """CUDA graphs (compile=reduce-overhead) write each replay's outputs into the same memory, so the gradients
    one micro-batch leaves in .grad would be overwritten by the next one's backward (pytorch/pytorch#169545):
    on a GPU, an error or wrong gradients after minutes of compiling. Refused when the config loads, before
    any stage (the quickstart's first) starts; either setting alone is fine."""
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, "vae.compile=reduce-overhead", "vae.grad_accum=2")
    assert str(error.value) == (
        "config key 'vae.compile' is reduce-overhead, which replays CUDA graphs, and each replay writes its outputs "
        "into the same memory: with vae.grad_accum=2, the gradients one micro-batch leaves would be overwritten by "
        "the next one's backward (pytorch/pytorch#169545). Set vae.grad_accum=1 with a larger vae.batch_size, or "
        "vae.compile=default")
    assert tiny_config(tmp_path, "ldm.compile=reduce-overhead").ldm.grad_accum == 1
    assert tiny_config(tmp_path, "ldm.compile=default", "ldm.grad_accum=2").ldm.grad_accum == 2


def test_round_trip_through_yaml(tmp_path):
    config = tiny_config(tmp_path, "seed=5", "data.captions=['Draw a {name}']")
    again = from_dict(Config, yaml.safe_load(dump_config(config)))
    assert again == config


def test_cli_dry_run_prints_resolved_config_and_errors_are_one_line(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "vae.train", "--config", str(TINY), "--set", "vae.max_steps=3",
                         "--set", f"run_dir={tmp_path}", "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["vae"]["max_steps"] == 3
    assert not (tmp_path / "config.yaml").exists()  # a dry run writes nothing
    bad = subprocess.run([sys.executable, "-m", "vae.train", "--config", str(TINY), "--set", "vae.typo=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert "unknown config key 'vae.typo'" in bad.stderr and "Traceback" not in bad.stderr


def test_every_command_takes_run_config_and_set_the_same_way_and_shows_an_example():
    for module, example in [("vae.train", "train-vae --config"), ("ldm.train_clip", "train-clip --config"),
                            ("ldm.encode", "encode-dataset --config"), ("ldm.train", "train-ldm --config"),
                            ("pipelines.generate", "generate --run"), ("pipelines.evaluate", "evaluate --config")]:
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
        assert all(flag in out for flag in ("--config", "--run", "--set", "--dry-run")), module
        assert f"example:\n  {example}" in out, module


def test_run_is_the_run_dir_and_the_stage_ends_with_a_summary(tmp_path):
    run = tmp_path / "by-run"
    done = subprocess.run([sys.executable, "-m", "vae.train", "--config", str(TINY), "--run", str(run),
                           "--set", "vae.max_steps=2"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "vae" / "config.json").is_file() and yaml.safe_load((run / "config.yaml").read_text())["run_dir"] == str(run)
    summary = [line for line in done.stdout.splitlines() if line.startswith("[vae] trained to step 2 in ")]
    assert len(summary) == 1 and "last logged: rec " in summary[0], done.stdout[-2000:]
