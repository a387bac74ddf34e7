"""Bad input gets a clear error; interruptions lose nothing; loading runs no foreign code."""

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import common.checkpoint
from common.checkpoint import CheckpointWriteError, DamagedFileError, load_tensors, save_tensors
from common.config import TrainConfig
from common.data import load_split
from common.errors import DatasetError, RunFolderError
from common.training import Trainer, TrainingDiverged
from conftest import ROOT, TINY, tiny_config
from ldm.encode import main as encode_main
from ldm.latents import StaleCacheError
from ldm.train import main as ldm_main
from pipelines import LatentPipeline
from pipelines.generate import load_pipeline
from vae.train import main as train_vae

STATE = "train_state"


def latest_state(run: Path, stage: str) -> Path:
    return sorted((run / STATE / stage).glob("state-*.safetensors"))[-1]


def interrupt_at_step(monkeypatch, step: int, signum=signal.SIGINT):
    """Send this process `signum` once the trainer has logged `step` steps, as Ctrl-C would."""
    original = Trainer.log

    def log(self, at, **values):
        original(self, at, **values)
        if at + 1 == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Trainer, "log", log)


# ---- interruptions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, monkeypatch, signum, code):
    config = tiny_config(tmp_path / "run", "vae.max_steps=6", "vae.save_every=100")
    interrupt_at_step(monkeypatch, 3, signum)
    with pytest.raises(SystemExit) as exit_info:
        train_vae(config)
    assert exit_info.value.code == code
    assert latest_state(tmp_path / "run", "vae").name == "state-00000003.safetensors"
    assert not (tmp_path / "run" / "vae").exists()  # nothing exported from an unfinished run
    monkeypatch.undo()
    train_vae(config)
    log = [json.loads(line) for line in (tmp_path / "run" / "logs" / "vae.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "rec" in r] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_in_a_real_process_exits_cleanly(tmp_path):
    """The command line: SIGINT mid-training gives exit status 130, a checkpoint and no traceback."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "vae.train", "--config", str(TINY), "--set", f"run_dir={run}",
               "--set", "vae.max_steps=100000", "--set", "vae.save_every=100000", "--set", "vae.log_every=1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "logs" / "vae.jsonl"
    deadline = time.time() + 120
    # three step records (the log's first line is the stage's setup record, not a step)
    while not (log.is_file() and sum('"event"' not in line for line in log.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    _, meta = load_tensors(latest_state(run, "vae"))
    assert meta["step"] >= 3


def test_encode_interrupted_keeps_finished_shards_and_resumes_to_the_same_cache(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "latents")
    config = tiny_config(run)  # 200 images in shards of 64: 4 shards
    import ldm.encode

    original = ldm.encode.image_batches
    calls = {"n": 0}

    def batches_then_interrupt(*args, **kwargs):
        for batch in original(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # the second shard's first batch (shards of 64 = 2 batches of 32)
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(ldm.encode, "image_batches", batches_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        encode_main(config)
    assert exit_info.value.code == 130
    assert sorted(p.name for p in (run / "latents").glob("shard-*")) == ["shard-00000.safetensors"]
    assert not (run / "latents" / "manifest.json").exists()
    monkeypatch.undo()
    encode_main(config)
    for shard in sorted((tiny_run / "latents").glob("shard-*")):
        a, _ = load_tensors(shard)
        b, _ = load_tensors(run / "latents" / shard.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage, problem", [
    ("cut short", "3000 bytes where its header describes "),
    ("garbage header", "its first bytes announce a 18446744073709551615-byte header, longer than the file's "),
])
def test_a_damaged_latent_shard_is_named_at_train_ldm_and_encoded_again(tiny_run, tmp_path, damage, problem):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shard = run / "latents" / "shard-00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:3000] if damage == "cut short" else b"\xff" * 8 + whole[8:])
    with pytest.raises(DamagedFileError, match=re.escape(f"{shard} is damaged ({problem}") + r".*" + re.escape(
            "; re-run `encode-dataset --config ...` to write it again")):
        ldm_main(tiny_config(run))
    encode_main(tiny_config(run))  # not "current, nothing to do": that one shard is encoded again
    assert shard.read_bytes() == whole


@pytest.mark.parametrize("component, tensor, command", [
    ("vae", "encoder.conv_out.weight", "train-vae"), ("text_encoder", "final_layer_norm.weight", "train-clip"),
    ("unet", "conv_out.bias", "train-ldm")])
def test_a_model_with_a_nan_weight_is_refused_where_it_is_loaded(tiny_run, tmp_path, component, tensor, command):
    """A NaN or infinite weight is structurally a whole file, and loads without a word: every latent, text state
    or image it touches is NaN. Before: encode-dataset cached NaN latents from such a VAE, and train-ldm then
    stopped on 20 non-finite losses in a row, saying "Lower ldm.lr or check the data"."""
    from safetensors.torch import load_file, save_file

    run = shutil.copytree(tiny_run, tmp_path / "run")
    weights = next((run / component).glob("*.safetensors"))
    tensors = load_file(weights)
    tensors[tensor].view(-1)[0] = float("inf" if component == "unet" else "nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    message = (f"{weights} holds non-finite weights (NaN or infinity in {tensor}): the model diverged or the file was "
               f"changed; re-run `{command} --config ...` to write it again")
    with pytest.raises(DamagedFileError) as error:
        LatentPipeline.from_pretrained(run)
    assert str(error.value) == message
    if component != "unet":  # the stages that read it refuse it before writing anything
        cache = {path.name: path.read_bytes() for path in (run / "latents").iterdir()}
        with pytest.raises(DamagedFileError) as error:
            (encode_main if component == "vae" else ldm_main)(tiny_config(run, "ldm.max_steps=6"))
        assert str(error.value) == message
        assert {path.name: path.read_bytes() for path in (run / "latents").iterdir()} == cache


def test_the_finite_weights_check_reads_every_dtype(tmp_path):
    """8-bit floats (torch's isfinite has no float8_e4m3fn kernel), integers and booleans are read too; a NaN
    among 8-bit floats is found."""
    from safetensors.torch import save_file

    from common.checkpoint import check_finite_weights

    path = tmp_path / "weights.safetensors"
    save_file({"scale": torch.ones(3).to(torch.float8_e4m3fn), "count": torch.arange(3, dtype=torch.int8),
               "mask": torch.ones(2, dtype=torch.bool)}, path)
    check_finite_weights(path, "train-ldm")
    save_file({"scale": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)}, path)
    with pytest.raises(DamagedFileError, match=re.escape("holds non-finite weights (NaN or infinity in scale)")):
        check_finite_weights(path, "train-ldm")


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path):
    """SIGKILL at random moments (checkpoint writes included: one every step); every restart resumes
    from the last complete checkpoint, and the end result equals a run that was never killed."""
    steps = 120
    overrides = ["--set", f"vae.max_steps={steps}", "--set", "vae.save_every=1", "--set", "vae.keep_checkpoints=2",
                 "--set", "vae.disc_start=-1"]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "vae.train", "--config", str(TINY), "--set", f"run_dir={straight}", *overrides],
                   cwd=ROOT, check=True, capture_output=True)
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "vae.train", "--config", str(TINY), "--set", f"run_dir={run}", *overrides]
    rng = random.Random(1234)
    resumed_from, newest = [], 0
    for attempt in range(3):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:  # wait until this attempt has trained a step
            files = sorted((run / STATE / "vae").glob("state-*.safetensors")) if (run / STATE / "vae").is_dir() else []
            if files and int(files[-1].stem.split("-")[1]) > newest:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in training, often mid-write (one checkpoint per step)
        process.kill()
        process.wait()
        _, meta = load_tensors(latest_state(run, "vae"))  # the newest file is always a complete one
        newest = meta["step"]
        resumed_from.append(newest)
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    assert resumed_from == sorted(resumed_from) and resumed_from[-1] < steps
    a, _ = load_tensors(latest_state(straight, "vae"))
    b, meta = load_tensors(latest_state(run, "vae"))
    assert meta["step"] == steps
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_full_disk_is_an_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run", "vae.max_steps=4", "vae.save_every=2")
    train_vae(config)
    latest_state(tmp_path / "run", "vae").unlink()  # as if it had died after step 2's checkpoint
    previous = latest_state(tmp_path / "run", "vae")
    before = previous.read_bytes()

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointWriteError, match="disk is full.*previous checkpoint is intact"):
        train_vae(config)
    assert previous.read_bytes() == before
    assert [p.name for p in (tmp_path / "run" / STATE / "vae").iterdir()] == [previous.name]  # no partial file


def test_non_finite_steps_are_skipped_then_training_stops_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 1)
    trainer = Trainer("unit", tiny_config(tmp_path / "unit"), TrainConfig(max_bad_steps=3, grad_clip=1.0, log_every=1))
    model = trainer.add("m", model)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        trainer.backward(model(torch.ones(2, 3, device=trainer.device)).sum() * float("nan"))
        finite = trainer.optimizer_step("m")
        assert not finite
        trainer.check_finite(finite, step)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped, not applied
    assert (trainer.skipped_steps, trainer.bad_steps_in_row) == (2, 2)
    trainer.backward(model(torch.ones(2, 3, device=trainer.device)).sum())
    assert trainer.optimizer_step("m")
    trainer.check_finite(True, 2)
    assert (trainer.skipped_steps, trainer.bad_steps_in_row) == (2, 0)  # a good step ends the streak
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TrainingDiverged, match=r"\[unit\] 3 steps in a row had a non-finite loss \(up to step 6\)"):
        for step in range(3, 6):
            trainer.check_finite(False, step)

    original = Trainer.backward

    def poisoned(self, loss):
        original(self, loss * float("nan") if self.step >= 2 else loss)

    monkeypatch.setattr(Trainer, "backward", poisoned)
    config = tiny_config(tmp_path / "run", "vae.max_steps=50", "vae.save_every=2", "vae.max_bad_steps=4")
    with pytest.raises(TrainingDiverged, match="4 steps in a row had a non-finite loss"):
        train_vae(config)
    _, meta = load_tensors(latest_state(tmp_path / "run", "vae"))
    assert meta["step"] == 2  # the last good checkpoint
    # the log stays strict JSON (jq and other readers refuse NaN): a non-finite number is logged as null
    log = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in logs/vae.jsonl"))
           for line in (tmp_path / "run" / "logs" / "vae.jsonl").read_text().splitlines()]
    norms = {r["step"]: r["grad_norm_vae"] for r in log if "grad_norm_vae" in r}
    assert norms[2] > 0 and norms[3] is None  # step 3 is the first poisoned one


def test_ldm_resume_is_exact(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / STATE / "ldm")
    config = tiny_config(run, "ldm.max_steps=6", "ldm.save_every=3", "ldm.sample_every=100")
    ldm_main(config)
    straight, _ = load_tensors(run / STATE / "ldm" / "state-00000006.safetensors")
    (run / STATE / "ldm" / "state-00000006.safetensors").unlink()
    ldm_main(config)
    resumed, _ = load_tensors(run / STATE / "ldm" / "state-00000006.safetensors")
    assert max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight) <= 1e-6


# ---- loading runs no foreign code ------------------------------------------------------------------


class Planted:
    """A pickle that, if ever unpickled, leaves a file behind."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant_pickle(path: Path, marker: Path) -> None:
    Planted.marker = str(marker)
    path.write_bytes(pickle.dumps(Planted()))


def test_planted_pickles_are_never_unpickled(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "executed"
    plant_pickle(run / "unet" / "diffusion_pytorch_model.bin", marker)
    plant_pickle(run / "text_encoder" / "pytorch_model.bin", marker)
    plant_pickle(run / STATE / "vae" / "state-99999999.pt", marker)
    pipe = LatentPipeline.from_pretrained(run)  # the safetensors beside them are used
    assert pipe.unet is not None
    train_vae(tiny_config(run))  # resume ignores anything but safetensors states
    (run / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):  # only a pickle left: refused
        LatentPipeline.from_pretrained(run)
    with pytest.raises(RunFolderError):
        load_pipeline(run)
    assert not marker.exists()


def test_a_pickled_lora_is_refused_not_unpickled(pipe, tmp_path):
    marker = tmp_path / "executed"
    plant_pickle(tmp_path / "pytorch_lora_weights.bin", marker)
    with pytest.raises(RunFolderError, match=re.escape(
            f"no LoRA weights in safetensors in {tmp_path} (it holds pytorch_lora_weights.bin; pickled weights are "
            f"never unpickled): pass the folder that train-ldm with ldm.lora_rank wrote")):
        pipe.load_lora_weights(tmp_path)
    shutil.copy(ROOT / "checkpoints" / "mnist-lora" / "pytorch_lora_weights.safetensors", tmp_path)
    for kwargs in ({"weight_name": "pytorch_lora_weights.bin"}, {"use_safetensors": False}):  # asked for by name
        with pytest.raises(ValueError, match=r"LoRA weights are read from safetensors files only, never unpickled"):
            pipe.load_lora_weights(tmp_path, **kwargs)
    assert not marker.exists()


@pytest.mark.parametrize("component, weights, command", [
    ("vae", "diffusion_pytorch_model.safetensors", "train-vae"),
    ("text_encoder", "model.safetensors", "train-clip"),
    ("unet", "diffusion_pytorch_model.safetensors", "train-ldm"),
])
def test_damaged_weights_are_named_with_the_command_that_writes_them(tiny_run, tmp_path, component, weights, command):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / component / weights
    os.truncate(path, 500)
    message = (rf"^{re.escape(str(path))} is damaged \(its first bytes announce a \d+-byte header, longer than the "
               rf"file's 500 bytes\); re-run `{command} --config \.\.\.` to write it again$")
    with pytest.raises(DamagedFileError, match=message):
        LatentPipeline.from_pretrained(run)
    with pytest.raises(DamagedFileError, match=message):
        load_pipeline(run)
    stage = {"vae": encode_main, "text_encoder": ldm_main}.get(component)  # the stages that read it
    if stage is not None:
        with pytest.raises(DamagedFileError, match=message):
            stage(tiny_config(run))


# ---- bad input -------------------------------------------------------------------------------------


def test_corrupt_images_are_skipped_with_a_count_or_refused(class_folder):
    (class_folder / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = class_folder / "square" / "000.png"
    (class_folder / "square" / "truncated.png").write_bytes(good.read_bytes()[:60])
    from common.config import DataConfig

    config = DataConfig(name="", path=str(class_folder), image_size=16, holdout_fraction=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_split(config, "train")
    assert len(dataset) == 18 and len(dataset.bad_images) == 2
    assert any("skipping 2 unreadable image(s)" in str(w.message) and "broken.png" in str(w.message) for w in caught)
    config.on_bad_image = "error"
    with pytest.raises(DatasetError, match="2 image\\(s\\) cannot be read: broken.png"):
        load_split(config, "train")


def test_malformed_metadata_lines_name_the_line(jsonl_folder):
    from common.config import DataConfig
    from common.data import list_dataset

    path = jsonl_folder / "metadata.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(DatasetError, match="line 4 is not valid JSON"):
        list_dataset(DataConfig(name="", path=str(jsonl_folder)))
    path.write_text("\n".join(lines[:2] + ['{"file_name": "images/missing.png", "text": "x"}']) + "\n")
    with pytest.raises(DatasetError, match="line 3: file 'images/missing.png' does not exist"):
        list_dataset(DataConfig(name="", path=str(jsonl_folder)))
    (jsonl_folder / "images" / "album.png").mkdir()  # before: "file 'images/album.png' does not exist"
    path.write_text(json.dumps({"file_name": "images/album.png", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: line 1: 'images/album.png' is a folder, not an "
                                           r"image file; name the image in it$"):
        list_dataset(DataConfig(name="", path=str(jsonl_folder)))
    outside = jsonl_folder.parent / "outside.png"
    outside.write_bytes((jsonl_folder / "images" / "0.png").read_bytes())
    (jsonl_folder / "images" / "link.png").symlink_to(outside)
    path.write_text(json.dumps({"file_name": "images/link.png", "text": "a link out"}) + "\n")
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        list_dataset(DataConfig(name="", path=str(jsonl_folder)))


def test_prompts_long_non_latin_empty_and_mixed(tiny_run):
    pipe = LatentPipeline.from_pretrained(tiny_run)
    pipe.set_progress_bar_config(disable=True)
    long_prompt = "Draw a six " + "with many many more words " * 10
    with pytest.warns(UserWarning, match="truncated to the text encoder's 16 tokens"):
        images = pipe([long_prompt, "क्ष 🎉", "", "Draw a 7"], num_inference_steps=2, output_type="np").images
    assert images.shape == (4, 16, 16, 1) and np.isfinite(images).all()
    with pytest.raises(TypeError, match="every prompt must be a string"):
        pipe(["Draw a six", None], num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
        pipe([], num_inference_steps=2)


def test_run_folder_missing_or_mixed_components(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "scheduler")
    with pytest.raises(RunFolderError, match=f"^scheduler/ is missing in {run}; re-run `train-ldm --config ...` into this "
                                             f"run folder to write it, or restore scheduler/ from a copy of the run$"):
        load_pipeline(run)
    with pytest.raises(RunFolderError, match="not a finished run"):
        load_pipeline(tmp_path)
    # a text encoder from another run (another width) next to this run's UNet
    pipe = LatentPipeline.from_pretrained(tiny_run)
    from transformers import CLIPTextConfig, CLIPTextModel

    wider = CLIPTextModel(CLIPTextConfig(vocab_size=600, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=12))
    with pytest.raises(RunFolderError, match="different runs"):
        LatentPipeline(pipe.vae, wider, pipe.tokenizer, pipe.unet, pipe.scheduler)
    # a mistyped folder is not reported as a failed Hugging Face Hub lookup
    for missing in [str(tmp_path / "no-such-run"), "checkpoints/no-such-run"]:
        with pytest.raises(FileNotFoundError) as caught:
            LatentPipeline.from_pretrained(missing)
        assert str(caught.value) == (
            f"no run folder '{missing}' (and no model of that name in the Hugging Face cache): pass the folder "
            f"train-ldm wrote (it holds model_index.json), e.g. LatentPipeline.from_pretrained('checkpoints/mnist')")


def test_a_tokenizer_without_its_vocabulary_is_refused(tiny_run, tmp_path):
    """Without tokenizer.json the tokenizer loads as its two special tokens, and every prompt reads the same."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "tokenizer" / "tokenizer.json").unlink()
    vocab_size = json.loads((run / "text_encoder" / "config.json").read_text())["vocab_size"]
    message = re.escape(f"{run / 'tokenizer' / 'tokenizer.json'} is missing, so the tokenizer knows 2 tokens, not the "
                        f"text encoder's {vocab_size}, and would read every prompt alike. Restore tokenizer/ from the "
                        f"run that trained the text encoder, or re-run `train-clip --config ...`")
    with pytest.raises(RunFolderError, match=f"^{message}$"):
        LatentPipeline.from_pretrained(run)
    with pytest.raises(RunFolderError, match=f"^{message}$"):
        ldm_main(tiny_config(run))


@pytest.mark.parametrize("text, problem", [
    ("{}", 'is not a pipeline index (it has no "_class_name")'),
    ("[]", 'is not a pipeline index (it has no "_class_name")'),
    ("not json", "is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ('{"_class_name": "LatentPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}',
     "names no scheduler, text_encoder, tokenizer, vae components"),
])
def test_a_damaged_model_index_is_a_clear_error(tmp_path, text, problem):
    (tmp_path / "model_index.json").write_text(text)  # refused before any component is read
    message = re.escape(f"{tmp_path / 'model_index.json'} {problem}; re-run `train-ldm --config ...` (it writes this "
                        f"file), or restore it from a copy of the run")
    with pytest.raises(RunFolderError, match=f"^{message}$"):
        LatentPipeline.from_pretrained(tmp_path)
    with pytest.raises(RunFolderError, match=message):
        load_pipeline(tmp_path)


def test_a_stale_latent_cache_is_refused_at_train_ldm(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "latents" / "manifest.json").unlink()
    with pytest.raises(StaleCacheError, match="no complete latent cache in .*; run `encode-dataset --config ...` first"):
        ldm_main(tiny_config(run))


def test_a_checkpoint_from_another_model_config_is_a_clear_error(tmp_path):
    train_vae(tiny_config(tmp_path / "run", "vae.max_steps=2"))
    with pytest.raises(RunFolderError, match=re.escape("was trained with other settings than this command's "
                                                       "(vae.block_out_channels: [8, 16] -> [16, 16])")):
        train_vae(tiny_config(tmp_path / "run", "vae.max_steps=2", "vae.block_out_channels=[16, 16]"))
    state = latest_state(tmp_path / "run", "vae")  # a checkpoint whose settings say nothing (older runs): its tensors
    tensors, meta = load_tensors(state)
    save_tensors(state, tensors, {k: v for k, v in meta.items() if k != "config"})
    with pytest.raises(RunFolderError, match="different vae model"):
        train_vae(tiny_config(tmp_path / "run", "vae.max_steps=2", "vae.block_out_channels=[16, 16]"))


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(3)}, {"step": 1})

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(common.checkpoint, "save_file", broken)
    with pytest.raises(CheckpointWriteError):
        save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(3)}, {"step": 2})
    tensors, meta = load_tensors(tmp_path / "a.safetensors")
    assert meta == {"step": 1} and torch.equal(tensors["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def killed_at(name: str, module: str, run: Path, *overrides: str) -> None:
    """Run the command `module` on `run` and kill it, as kill -9 would (no cleanup), the moment a finished write is
    about to be renamed onto `name`."""
    settings = [arg for override in (f"run_dir={run}", *overrides) for arg in ("--set", override)]
    code = ("import os, runpy, sys\nreplace = os.replace\n"
            f"os.replace = lambda a, b: os._exit(137) if os.path.basename(b) == {name!r} else replace(a, b)\n"
            f"sys.argv = [{module!r}, '--config', {str(TINY)!r}, *{settings!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__')")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 137


def test_writes_killed_mid_way_leave_nothing_behind_once_their_stage_runs_again(tiny_run, tmp_path):
    """Before: a shard or component folder written when kill -9 came stayed as a hidden temporary file or folder
    (as large as what it held, one per kill) for good; only train_state's were removed."""
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock-*"))
    killed_at("unet", "ldm.train", run)  # the old unet/ moved aside, the new one complete under its temporary name
    shutil.rmtree(run / "latents")
    killed_at("shard-00001.safetensors", "ldm.encode", run)
    left = sorted(p.relative_to(run).as_posix().split(".")[1] for p in run.rglob(".*.tmp"))
    assert left == ["shard-00001", "unet"] and (run / ".unet.old").is_dir()
    encode_main(tiny_config(run))
    ldm_main(tiny_config(run))
    assert not list(run.rglob(".*.tmp")) and not (run / ".unet.old").exists()
    assert common.checkpoint.folder_fingerprint(run / "unet") == common.checkpoint.folder_fingerprint(tiny_run / "unet")


def test_a_run_killed_between_writing_its_unet_and_its_index_is_refused_not_loaded(tiny_run, tmp_path):
    """Before: train-ldm killed after swapping in unet/ but before scheduler/ and model_index.json left the new UNet
    (here trained for epsilon) beside the old scheduler (v_prediction) and index, and the run loaded without a word."""
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock-*"))
    shutil.rmtree(run / STATE / "ldm")
    killed_at(".scheduler.old", "ldm.train", run, "ldm.prediction_type=epsilon")
    with pytest.raises(RunFolderError) as error:
        LatentPipeline.from_pretrained(run)
    assert str(error.value) == (
        f"unet/ in {run} is not the UNet its model_index.json was written with: train-ldm was stopped while writing "
        f"them, or unet/ was replaced since. Re-run `train-ldm --config ...` into this run folder to write both again "
        f"(or restore the old unet/)")
    ldm_main(tiny_config(run, "ldm.prediction_type=epsilon"))  # the same command finishes what it was writing
    assert LatentPipeline.from_pretrained(run).scheduler.config.prediction_type == "epsilon"


def unfinished(run: Path, stage: str, component: str, newest_step: int) -> str:
    """RunFolder.check_finished's refusal: `component`/ was exported at step 4, the stage's newest state is later."""
    command = {"vae": "train-vae", "clip": "train-clip", "ldm": "train-ldm"}[stage]
    return (f"{command} is unfinished in {run}: {run / STATE / stage / f'state-{newest_step:08d}.safetensors'} is newer "
            f"than the {component}/ it wrote (at step 4), so {component}/ is not the model config.yaml describes. "
            f"Re-run `{command} --config ...` to finish it first")


def test_a_stage_started_again_and_stopped_is_refused_by_the_stages_built_on_it(tiny_run, tmp_path, monkeypatch):
    """Before: train-vae started again with other settings (its train_state deleted, as the resume refusal says) and
    stopped left the old vae/ in place: encode-dataset found its cache current and train-ldm trained on the old VAE,
    while config.yaml described the new one."""
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock-*"))
    shutil.rmtree(run / STATE / "vae")
    config = tiny_config(run, "vae.max_steps=6", "vae.save_every=100")
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train_vae(config)
    monkeypatch.undo()
    for main in (encode_main, ldm_main):
        with pytest.raises(RunFolderError) as error:
            main(config)
        assert str(error.value) == unfinished(run, "vae", "vae", 3)
    train_vae(config)
    encode_main(config)
    assert json.loads((run / "latents" / "manifest.json").read_text())["vae"] == common.checkpoint.folder_fingerprint(run / "vae")


def test_train_clip_killed_between_its_text_encoder_and_tokenizer_is_refused_at_train_ldm(tiny_run, tmp_path):
    """The new text encoder beside the old tokenizer would read prompts with other token ids than it learned."""
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock-*"))
    shutil.rmtree(run / STATE / "clip")
    killed_at(".tokenizer.old", "ldm.train_clip", run, "clip.max_steps=6")
    with pytest.raises(RunFolderError) as error:
        ldm_main(tiny_config(run, "clip.max_steps=6"))
    assert str(error.value) == unfinished(run, "clip", "tokenizer", 6)


def test_evaluate_refuses_a_run_whose_train_ldm_was_started_again_and_stopped(tiny_run, tmp_path, monkeypatch):
    """Before: it scored the old unet/ and wrote that into run/eval.json while config.yaml described the new UNet."""
    from pipelines.evaluate import main as evaluate_main

    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock-*"))
    shutil.rmtree(run / STATE / "ldm")
    config = tiny_config(run, "ldm.max_steps=6", "ldm.save_every=100", "ldm.sample_every=100")
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit):
        ldm_main(config)
    with pytest.raises(RunFolderError) as error:
        evaluate_main(config)
    assert str(error.value) == unfinished(run, "ldm", "unet", 3)
    assert not (run / "eval.json").exists()
