"""Reliability, round two: every fault class of issue 16 either gives a clear error before anything is
written, or a correct result. One table per class of fault."""

import json
import math
import os
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import SafetensorError

import common.checkpoint
from common.checkpoint import CheckpointWriteError, load_tensors, save_tensors, write_json
from common.config import ConfigError, DataConfig
from common.config_yaml import load_config, parse_override
from common.data import ImageDataset, list_dataset, load_split
from common.data.pixels import to_mode
from common.errors import DatasetError, RunFolderError, UserError
from common.run import RunLock
from conftest import ROOT, TINY, shape_image, tiny_config
from ldm.encode import main as encode_main
from ldm.text import check_classes_read_apart, train_tokenizer
from ldm.train import main as ldm_main
from ldm.train_clip import main as clip_main
from pipelines import LatentPipeline
from vae.train import main as train_vae


# ---- configuration: refused up front, naming key and value ------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("clip.patch_size=0", "config key 'clip.patch_size' must be >= 1, got 0"),
    ("vae.norm_num_groups=0", "config key 'vae.norm_num_groups' must be >= 1, got 0"),
    ("ldm.norm_num_groups=0", "config key 'ldm.norm_num_groups' must be >= 1, got 0"),
    ("vae.block_out_channels=[]", "config key 'vae.block_out_channels' must be a non-empty list of positive widths, got []"),
    ("ldm.block_out_channels=[]", "config key 'ldm.block_out_channels' must be a non-empty list of positive widths, got []"),
    ("encode.shard_size=0", "config key 'encode.shard_size' must be >= 1, got 0"),
    ("encode.shard_size=-5", "config key 'encode.shard_size' must be >= 1, got -5"),
    ("sample.num_inference_steps=1001", "config key 'sample.num_inference_steps' must be in [1, ldm.num_train_timesteps - 1 = 999], got 1001"),
    ("sample.num_inference_steps=1000", "config key 'sample.num_inference_steps' must be in [1, ldm.num_train_timesteps - 1 = 999], got 1000"),
    ("evaluate.tune_steps=[20,1000]", "config key 'evaluate.tune_steps' must be a non-empty list of steps in [1, ldm.num_train_timesteps - 1 = 999], got [20, 1000]"),
    ("evaluate.images_per_class=0", "config key 'evaluate.images_per_class' must be >= 1, got 0"),
    ("evaluate.classifier_steps=0", "config key 'evaluate.classifier_steps' must be >= 1, got 0"),
    ("data.captions=['Draw a {name']", "config key 'data.captions[0]' 'Draw a {name' is not a caption template"),
    ("data.captions=['{0}']", "config key 'data.captions[0]' '{0}' is not a caption template (every {} must name a field"),
    ("data.captions=['Draw {name!x}']", "config key 'data.captions[0]' 'Draw {name!x}' is not a caption template "
                                        "({name!x} has a conversion or format spec; write the field as {name})"),
    ("data.captions=['{name}', '{name:>>>}']", "config key 'data.captions[1]' '{name:>>>}' is not a caption template "
                                               "({name:>>>} has a conversion or format spec; write the field as {name})"),
    ("data.captions=[' ']", "config key 'data.captions[0]' ' ' is not a caption template (it is empty, which is the "
                            "unconditional prompt"),
    ("evaluate.paraphrases=['{symbol!r} please']", "config key 'evaluate.paraphrases[0]' '{symbol!r} please' is not a "
                                                   "caption template ({symbol!r} has a conversion or format spec"),
    ("vae.kl_weight=.nan", "config key 'vae.kl_weight' must be a finite number, got nan"),
    ("sample.guidance_scale=.inf", "config key 'sample.guidance_scale' must be a finite number, got inf"),
    ("seed=-1", "config key 'seed' must be in [0, 2**63), got -1"),
    ("seed=9223372036854775808", "config key 'seed' must be in [0, 2**63), got 9223372036854775808"),
    ("evaluate.classifier_seed=18446744073709551616",
     "config key 'evaluate.classifier_seed' must be in [0, 2**63), got 18446744073709551616"),
    ("ldm.attention_heads=3", "config key 'ldm.attention_heads' (3) must divide every ldm.block_out_channels [32, 32]"),
    ("clip.text_heads=3", "config key 'clip.text_heads' (3) must divide clip.text_hidden (32)"),
    ("clip.vocab_size=300", "config key 'clip.vocab_size' must be >= 514 (every byte, alone and word-final, and the "
                            "start and end tokens, so that any prompt tokenizes; tokens beyond those are merges learned "
                            "from the captions), got 300"),
])
def test_bad_values_are_refused_naming_key_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, override)
    assert message in str(error.value)


def test_overrides_mean_what_they_say(tmp_path):
    assert parse_override("run_dir=runs/exp #3") == ("run_dir", "runs/exp #3")  # not YAML: '#' is no comment
    assert parse_override("data.path=data: 2024/no") == ("data.path", "data: 2024/no")
    assert parse_override("data.name=no") == ("data.name", "no")  # YAML would read `no` as False
    assert tiny_config(tmp_path, "vae.lr=3e-4").vae.lr == 3e-4  # other keys: YAML, then type-checked
    assert parse_override("ldm.cross_attention=[true, false]") == ("ldm.cross_attention", [True, False])
    assert tiny_config(tmp_path / "exp #3").run_dir == str(tmp_path / "exp #3")
    assert load_config(TINY, ["run_dir=~/somewhere"]).run_dir == os.path.expanduser("~/somewhere")


def test_config_files_with_a_key_twice_or_not_utf8_are_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("vae:\n  max_steps: 3\nseed: 1\nvae:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml': key 'vae' appears twice \(lines 1 and 4\)"):
        load_config(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml' is not UTF-8 text \(byte 14\); save it as UTF-8"):
        load_config(latin)


# ---- the run folder: nothing lost, nothing interleaved ----------------------------------------------


def test_a_failed_input_check_leaves_the_saved_config_alone(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "config.yaml").read_bytes()
    (run / "latents" / "manifest.json").unlink()
    from ldm.latents import StaleCacheError

    with pytest.raises(StaleCacheError):
        ldm_main(tiny_config(run, "ldm.lr=0.0005"))
    assert (run / "config.yaml").read_bytes() == before


def test_two_commands_on_one_stage_of_a_run_folder_are_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, "vae"):
        with pytest.raises(RunFolderError, match=r"is in use: its vae stage is being written by `.*` \(pid \d+ on "):
            train_vae(tiny_config(run, "vae.max_steps=1"))
    train_vae(tiny_config(run, "vae.max_steps=1"))  # released: the same command now runs
    with RunLock(run, "vae"):  # and the finished run released it too
        pass



def test_a_stage_refused_before_writing_leaves_no_run_folder_behind(tmp_path):
    """Before: train-vae on a folder of no images made run_dir and left its .lock-vae file there."""
    (tmp_path / "empty").mkdir()
    config = tiny_config(tmp_path / "new" / "run", "data.name=", f"data.path={tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match=r"^no images of a supported type "):
        train_vae(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    (tmp_path / "kept").mkdir()  # a run folder that was there already is kept, with what it holds
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError):
        train_vae(tiny_config(tmp_path / "kept", "data.name=", f"data.path={tmp_path / 'empty'}"))
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
    with pytest.raises(RuntimeError, match="^written, then failed$"), RunLock(tmp_path / "wrote" / "run", "vae"):
        (tmp_path / "wrote" / "run" / "vae").mkdir()  # a stage that wrote, then failed: what it wrote is kept
        raise RuntimeError("written, then failed")
    assert [p.name for p in (tmp_path / "wrote" / "run").iterdir()] == ["vae"]

@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_a_run_dir_or_out_folder_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch, capsys, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("not a folder")
        problem = f"'{target}' is a file, not a folder; choose another path"
    elif kind == "under-a-file":  # not "read-only": the fix is another path, not permissions
        (tmp_path / "file").write_text("not a folder")
        target = tmp_path / "file" / "sub"
        problem = f"'{target}' cannot be created: '{tmp_path / 'file'}' is a file, not a folder; choose another path"
    else:
        monkeypatch.setattr(common.checkpoint.os, "access", lambda path, mode: False)
        problem = f"'{target}' cannot be written"
    with pytest.raises(UserError, match=f"run_dir {problem}"):
        train_vae(tiny_config(target))
    from pipelines.generate import cli as generate_cli

    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(ROOT / "checkpoints" / "mnist"), "--out", str(target), "--steps", "1", "--num", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: --out {problem}" in err
    assert "Loading pipeline" not in err  # refused before any work


@pytest.mark.parametrize("option, message", [
    (["--seed", "18446744073709551616"], "--seed must be in [0, 2**63), got 18446744073709551616"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["--write", ""], "--write has nothing to write (''): give it text"),
    (["--write", "  "], "--write has nothing to write ('  '): give it text"),
])
def test_generate_options_that_cannot_work_are_refused_before_loading(tmp_path, capsys, option, message):
    from pipelines.generate import cli as generate_cli

    with pytest.raises(SystemExit) as exit_info:
        generate_cli(["--run", str(ROOT / "checkpoints" / "mnist"), "--out", str(tmp_path / "out"), *option])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: {message}" in err
    assert "Loading pipeline" not in err and not (tmp_path / "out").exists()


def test_a_stage_built_on_changed_inputs_is_refused_not_resumed(tiny_run, tmp_path):
    """Retrain (here: change) the VAE of a finished run and re-encode: train-ldm must not resume its
    finished state and re-export the old UNet; the pipeline must not pair the new VAE with that UNet."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    vae = __import__("diffusers").AutoencoderKL.from_pretrained(run / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(run / "vae")
    with pytest.raises(RunFolderError, match=r"vae/ in .* changed after unet/ was trained on it: the UNet no longer matches"):
        LatentPipeline.from_pretrained(run)
    encode_main(tiny_config(run))
    with pytest.raises(RunFolderError, match=r"the ldm checkpoint state-00000004.safetensors \(step 4\) was trained on "
                                             r"another latent_cache than this run has now \(the VAE was retrained"):
        ldm_main(tiny_config(run))
    shutil.rmtree(run / "train_state" / "ldm")  # the fix the message gives
    ldm_main(tiny_config(run))
    assert LatentPipeline.from_pretrained(run).unet is not None


def test_resuming_with_other_settings_is_refused_and_config_yaml_keeps_the_checkpoints(tmp_path):
    """A checkpoint resumed under other settings would give weights its config.yaml cannot reproduce."""
    run = tmp_path / "run"
    train_vae(tiny_config(run, "vae.max_steps=2"))
    saved, states = (run / "config.yaml").read_text(), sorted((run / "train_state" / "vae").iterdir())
    with pytest.raises(RunFolderError, match=re.escape(
            "the vae checkpoint state-00000002.safetensors (step 2) was trained with other settings than this command's "
            "(seed: 0 -> 5; vae.lr: 0.001 -> 0.01). Resuming would give a model that no config reproduces. Run the stage "
            f"with the checkpoint's settings (they are in {run / 'config.yaml'}), delete {run / 'train_state' / 'vae'} to "
            "train it again, or use a new run_dir")):
        train_vae(tiny_config(run, "vae.max_steps=2", "seed=5", "vae.lr=0.01"))
    with pytest.raises(RunFolderError, match=re.escape(
            "(vae.max_steps: 2 -> 3). Resuming would give a model that no config reproduces. ") + ".*" + re.escape(
            f"(the learning rate's cosine follows vae.max_steps; to train these weights further, start a new run with "
            f"vae.init_from={run})")):
        train_vae(tiny_config(run, "vae.max_steps=3"))
    assert (run / "config.yaml").read_text() == saved and sorted((run / "train_state" / "vae").iterdir()) == states
    train_vae(tiny_config(run, "vae.max_steps=2", "vae.log_every=2", "vae.save_every=1"))  # logging and saving may change
    state = run / "train_state" / "vae" / "state-00000002.safetensors"  # saved by a version without vae.kl_weight:
    tensors, meta = load_tensors(state)                                   # a key it lacks is not a change
    del meta["config"]["vae"]["kl_weight"]
    save_tensors(state, tensors, meta)
    train_vae(tiny_config(run, "vae.max_steps=2"))


def test_a_stage_saves_only_its_own_sections_and_refuses_another_seed_or_dataset(tiny_run, tmp_path, capsys):
    """config.yaml keeps what each stage of the run was trained with: train-ldm given VAE settings does not
    rewrite the VAE's, and a second seed or dataset in one run folder is refused before anything is written."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ldm_main(tiny_config(run, "vae.latent_channels=8", "clip.text_layers=4", "ldm.log_every=2"))  # resumes, re-exports
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["vae"]["latent_channels"], saved["clip"]["text_layers"], saved["ldm"]["log_every"]) == (4, 1, 2)
    out = capsys.readouterr().out
    assert "[ldm] not used by this stage, and not saved: vae.latent_channels: 4 -> 8 (config.yaml keeps the value" in out
    assert "[ldm] not used by this stage, and not saved: clip.text_layers: 1 -> 4" in out
    before = (run / "config.yaml").read_text()
    for stage, name, override, change in ((ldm_main, "ldm", "seed=7", "seed: 0 -> 7"),
                                          (encode_main, "encode", "data.max_per_class=10", "data.max_per_class: 20 -> 10")):
        others = ", ".join(s for s in ("vae", "clip", "encode", "ldm") if s != name)
        with pytest.raises(RunFolderError, match=re.escape(
                f"{run} holds the {others} stage(s), trained with other settings than this {name} command's ({change}; "
                f"from {run / 'config.yaml'} to this command's). One run folder has one seed and one dataset")):
            stage(tiny_config(run, override))
    assert (run / "config.yaml").read_text() == before


def test_a_tokenizer_changed_after_the_unet_was_trained_is_refused(tiny_run, tmp_path):
    """Same size as the text encoder's vocabulary (so check_tokenizer passes), but it reads prompts otherwise."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert set(json.loads((run / "model_index.json").read_text())["built_from"]) == {"vae", "text_encoder", "tokenizer", "unet"}
    settings = json.loads((run / "tokenizer" / "tokenizer_config.json").read_text())
    settings["model_max_length"] = 8  # prompts now cut at 8 tokens, not the 16 the UNet learned from
    (run / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(RunFolderError, match=r"tokenizer/ in .* changed after unet/ was trained on it"):
        LatentPipeline.from_pretrained(run)


# ---- sampling: never NaN images without a word -------------------------------------------------------


def test_sampling_faults_are_clear_errors(tiny_run, pipe, tmp_path):
    for scale in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            pipe("Draw a six", guidance_scale=scale, num_inference_steps=2)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels"):
        pipe("Draw a six", height=15, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"DPMSolverMultistepScheduler with 1000 steps repeats 1 timestep\(s\) .* use fewer steps"):
        pipe("Draw a six", num_inference_steps=1000)

    def poison(pipe, i, t, tensors):
        return {"latents": tensors["latents"] * float("nan")}

    with pytest.raises(FloatingPointError, match=r"sampling gave non-finite latents \(DPMSolverMultistepScheduler, 2 steps"):
        pipe("Draw a six", num_inference_steps=2, callback_on_step_end=poison)
    for scale in (0.0, float("nan")):
        run = tmp_path / f"scale{scale}"
        shutil.copytree(tiny_run, run)
        config = json.loads((run / "vae" / "config.json").read_text())
        config["scaling_factor"] = scale
        (run / "vae" / "config.json").write_text(json.dumps(config))
        with pytest.raises(RunFolderError, match="vae/config.json has scaling_factor .*; it must be a positive number"):
            LatentPipeline.from_pretrained(run)


# ---- datasets: no merged classes, no leaks, content-true fingerprints --------------------------------


def listing_error(folder: Path) -> str:
    """The DatasetError message with which listing `folder` as a folder dataset stops."""
    with pytest.raises(DatasetError) as error:
        list_dataset(DataConfig(name="", path=str(folder)))
    return str(error.value)


@pytest.mark.parametrize("names", [("red-car", "red_car"), ("Cat", "cat"), ("a b", "a  b")])
def test_classes_a_prompt_cannot_tell_apart_are_refused(tmp_path, names):
    root = tmp_path / "classes"
    for name in names:
        (root / name).mkdir(parents=True)
        shape_image("circle", (16, 16)).save(root / name / "0.png")
    first, second = sorted(names)
    with pytest.raises(DatasetError, match=f"classes '{first}' and '{second}' get the same caption"):
        ImageDataset(DataConfig(name="", path=str(root)), "all")


def test_class_names_that_differ_only_in_unicode_normalisation_are_refused(tmp_path):
    root = tmp_path / "classes"
    for name in (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")):
        (root / name).mkdir(parents=True)
        shape_image("circle", (16, 16)).save(root / name / "0.png")
    with pytest.raises(DatasetError) as error:
        ImageDataset(DataConfig(name="", path=str(root)), "all")
    assert str(error.value) == ("classes 'cafe\\u0301' and 'caf\\xe9' get the same caption ('café', case, separators and "
                                "Unicode normalisation aside); rename one of the folders, or merge them")


def test_class_prompts_the_tokenizer_reads_alike_are_refused():
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    tokenizer = train_tokenizer([nfc, "Draw a six"], 514, 16)
    check_classes_read_apart(tokenizer, ["6", "7"], ["Draw a six", "Draw a seven"], "clip.max_length")  # apart
    with pytest.raises(DatasetError) as error:
        check_classes_read_apart(tokenizer, ["a", "b"], [nfc, nfd], "clip.max_length")
    assert str(error.value) == ("classes 'a' and 'b' would be merged: the tokenizer reads their prompts 'caf\\xe9' and "
                                "'cafe\\u0301', normalised (Unicode NFC, lowercase), as the same text 'café'. Rename one "
                                "of the class folders, or merge them")
    long = ["pineapple red large round one", "pineapple red large round two"]  # alike in their first 16 tokens
    with pytest.raises(DatasetError) as error:
        check_classes_read_apart(tokenizer, ["one", "two"], long, "")  # a pretrained tokenizer: no longer one to ask for
    assert str(error.value) == (
        "classes 'one' and 'two' would be merged: the tokenizer reads their prompts 'pineapple red large round one' and "
        "'pineapple red large round two', cut to its 16 tokens, as the same text 'pineapple red la'. Shorten the class "
        "names or the templates (data.captions) so that they differ within the first 16 tokens")


def test_train_clip_refuses_classes_its_tokenizer_truncates_alike_before_writing(tmp_path):
    root = tmp_path / "classes"
    for name in ("pineapple_red_large_round_one", "pineapple_red_large_round_two"):
        (root / name).mkdir(parents=True)
        for i in range(5):  # one held out
            shape_image("circle", (16, 16), seed=i).save(root / name / f"{i}.png")
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"classes 'pineapple_red_large_round_one' and 'pineapple_red_large_round_two' "
                                           r"would be merged: .* cut to its 16 tokens, as the same text 'pineapple red "
                                           r"la'. Raise clip.max_length, or shorten the class names"):
        clip_main(tiny_config(run, "data.name=", f"data.path={root}", "data.captions=['{name}']"))
    assert not (run / "config.yaml").exists() and not (run / "tokenizer").exists()
    clip_main(tiny_config(run, "data.name=", f"data.path={root}", "data.captions=['{name}']", "clip.max_length=32",
                          "clip.max_steps=1"))  # the fix the message names


def test_metadata_jsonl_duplicates_limits_and_encoding(jsonl_folder):
    path = jsonl_folder / "metadata.jsonl"
    config = DataConfig(name="", path=str(jsonl_folder))
    path.write_text(json.dumps({"file_name": "images/1.png", "text": "a"}) + "\n"
                    + json.dumps({"file_name": "./images/1.png", "text": "b"}) + "\n")
    with pytest.raises(DatasetError, match=r"lines 1 and 2 name the same image \('./images/1.png'\)"):
        list_dataset(config)
    with pytest.raises(DatasetError, match="data.max_per_class=3 needs a class dataset"):
        list_dataset(DataConfig(name="", path=str(jsonl_folder), max_per_class=3))
    path.write_bytes(b'{"file_name": "images/1.png", "text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl is not UTF-8 text \(byte 42\)"):
        list_dataset(config)


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.parquet", "metadata.json"])
def test_captions_in_a_metadata_file_other_than_jsonl_are_refused_not_lost(flowers_folder, name):
    """Before: with no metadata.jsonl the folder was read as class_index files, its captions ignored: img_0001.png
    files became one class 'img' captioned "Draw an img"."""
    (flowers_folder / name).write_text("file_name,text\ntulips_0000.jpg,a red tulip\n")
    assert listing_error(flowers_folder) == (
        f"'{flowers_folder / name}' is not read: captions come from metadata.jsonl only (one {{\"file_name\": "
        f"\"a.png\", \"text\": \"a red circle\"}} per line), and without it the folder would be read as classes named "
        f"by folders or file names. Convert it to metadata.jsonl, or remove it if the classes are meant")


@pytest.mark.parametrize("text", [[], "", "  ", ["a red circle", " "]])
def test_metadata_jsonl_lines_without_a_caption_are_refused(jsonl_folder, text):
    """An empty caption is the unconditional prompt: train-ldm would train the image with no caption, and an
    empty list crashed train-clip."""
    lines = (jsonl_folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file_name": "images/2.png", "text": text})
    (jsonl_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert listing_error(jsonl_folder) == (
        f"{jsonl_folder / 'metadata.jsonl'}: line 3: 'text' of 'images/2.png' is empty or holds an empty caption (got "
        f"{text!r}); an empty caption is the unconditional prompt, so the image would be trained with no caption at "
        f"all. Write its caption, or delete the line")


def test_a_class_name_with_a_newline_is_refused(tmp_path):
    root = tmp_path / "classes"
    for name in ("ok", "two\nlines"):
        (root / name).mkdir(parents=True)
        shape_image("square", (16, 16)).save(root / name / "0.png")
    with pytest.raises(DatasetError, match=r"class name 'two\\nlines' .* contains a control character"):
        list_dataset(DataConfig(name="", path=str(root)))


@pytest.mark.parametrize("layout, key", [("folders", "_-_"), ("folders", " "), ("class_index", "")])
def test_a_class_name_of_separators_alone_is_refused(tmp_path, layout, key):
    """Before: its name became "", so the "{name}" template captioned its images with the empty prompt (the
    unconditional one) and generate/evaluate drew that class unconditionally."""
    root = tmp_path / "classes"
    root.mkdir()
    for name in ("cat", key):
        if layout == "folders":
            (root / name).mkdir()
            shape_image("square", (16, 16)).save(root / name / "0.png")
        else:
            shape_image("square", (16, 16)).save(root / f"{name}_0001.png")
    with pytest.raises(DatasetError, match=rf"^class name {re.escape(repr(key))} in '{re.escape(str(root))}' is empty "
                                           r"once '_' and '-' are read as spaces, so its caption would be the empty "
                                           r"prompt \(no condition\); rename the folder \(or the files, in the "
                                           r"class_index layout\) to what its images show$"):
        list_dataset(DataConfig(name="", path=str(root)))


@pytest.mark.parametrize("split", ["train", "all"])
def test_a_class_left_with_no_readable_training_image_is_refused(class_folder, split):
    """It would stay in the class table, drawn and evaluated, with the model never having seen it."""
    for file in (class_folder / "square").iterdir():
        file.write_bytes(b"not an image")
    config = DataConfig(name="", path=str(class_folder), image_size=16, holdout_fraction=0.2)
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(DatasetError) as error:
        load_split(config, split)
    assert str(error.value) == (
        f"class 'square' has no readable training image: all 5 of its training files in '{class_folder / 'square'}' "
        f"are unreadable (square/000.png, square/001.png, square/002.png, square/003.png, square/004.png); fix or "
        f"replace them, or remove the class folder")


def test_an_unreadable_held_out_split_is_named(class_folder):
    for kind in ("circle", "square", "triangle"):  # the last file of each class is the held-out one
        (class_folder / kind / "005.png").write_bytes(b"not an image")
    config = DataConfig(name="", path=str(class_folder), image_size=16, holdout_fraction=0.2)
    assert len(load_split(config, "train")) == 15
    with pytest.warns(UserWarning, match="skipping 3"), pytest.raises(DatasetError) as error:
        load_split(config, "holdout")
    assert str(error.value) == (
        "no readable images are left in the 'holdout' split: all 3 of its files are unreadable (circle/005.png, "
        "square/005.png, triangle/005.png) (which files are held out is decided before any is read); fix or replace them")


def test_held_out_folders_without_training_folders_are_refused(tmp_path):
    root = tmp_path / "split"
    for split, classes in [("Train", ["cat", "dog"]), ("Test", ["bird", "cat", "dog"])]:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            shape_image("circle", (16, 16)).save(root / split / name / "0.png")
    assert listing_error(root) == (
        f"held-out class folder '{root / 'Test' / 'bird'}' has no training folder (no 'bird' in '{root / 'Train'}'), "
        f"so the model would never learn class 'bird'; add its training images there, or remove the held-out folder")
    # a test/ folder beside class folders, with no train/ folder: not a class called 'test'
    root = tmp_path / "flat"
    for name in ["cat", "dog", "test"]:
        (root / name).mkdir(parents=True)
        shape_image("circle", (16, 16)).save(root / name / "0.png")
    assert listing_error(root) == (
        f"'{root / 'test'}' is named like a held-out split, but '{root}' has no train/ folder beside it, so it would be "
        f"read as a class called 'test'. Put the training class folders in '{root / 'train'}' (with the held-out ones "
        f"in '{root / 'test'}'), or rename the folder if 'test' really is a class")


def test_image_files_beside_class_folders_are_refused_not_left_out(flowers_folder, class_folder):
    """Before: a folder with any sub-folder was read as class folders alone, so one sub-folder added to a class_index
    folder made the dataset that one class, every tulips_0001.jpg left out without a word (stray files likewise)."""
    (flowers_folder / "extra").mkdir()
    shape_image("circle", (16, 16)).save(flowers_folder / "extra" / "a.png")
    assert listing_error(flowers_folder) == (
        f"'{flowers_folder}' has sub-folders (extra) and also 10 image file(s) directly in it (orchids_0000.jpg, "
        f"orchids_0001.jpg, orchids_0002.jpg ...), which would not be read: only the sub-folders are read (one per "
        f"class, or train/ and test/ ones). Move the images into their class folders, or the sub-folders out if the "
        f"files are the dataset (the class_index layout: tulips_0001.jpg)")
    for split in ("Train", "Test"):  # a file beside the class folders of a split
        for kind in ("circle", "square"):
            (class_folder / split / kind).mkdir(parents=True)
            shape_image(kind, (16, 16)).save(class_folder / split / kind / "0.png")
    for kind in ("circle", "square", "triangle"):
        shutil.rmtree(class_folder / kind)
    shape_image("circle", (16, 16)).save(class_folder / "Train" / "stray.png")
    with pytest.raises(DatasetError, match=rf"^'{re.escape(str(class_folder / 'Train'))}' has sub-folders \(circle, "
                                           r"square\) and also 1 image file\(s\) directly in it \(stray.png\), which"):
        list_dataset(DataConfig(name="", path=str(class_folder)))
    for split in ("Train", "Test"):  # train/ holding only files (Hugging Face's split folders)
        for kind in ("circle", "square"):
            shutil.rmtree(class_folder / split / kind)
    assert listing_error(class_folder) == (
        f"'{class_folder / 'Train'}' is a split folder but holds 1 image file(s) directly (stray.png), which would not "
        f"be read: a split folder holds one sub-folder per class. Move the images into class folders in it, or set "
        f"data.path to '{class_folder / 'Train'}' if it is a dataset of its own")


def test_a_folder_of_images_beside_train_and_test_is_refused_not_left_out(tmp_path):
    """Before: with train/ and test/ present, any other sub-folder (a class put beside them) was never read."""
    root = tmp_path / "split"
    for folder in ("Train/cat", "Test/cat", "zebra", "docs"):
        (root / folder).mkdir(parents=True)
    for folder in ("Train/cat", "Test/cat", "zebra"):
        shape_image("circle", (16, 16)).save(root / folder / "0.png")
    (root / "docs" / "notes.txt").write_text("not images: no error")
    assert listing_error(root) == (
        f"'{root / 'zebra'}' holds images but would not be read: beside '{root / 'Train'}' only split folders (test, "
        f"train, training, val, valid, validation) are read. Move it into '{root / 'Train'}' if it is a class (or its "
        f"class folders, if it holds them), or move it out of '{root}'")
    shutil.rmtree(root / "zebra")
    assert [c.key for c in list_dataset(DataConfig(name="", path=str(root))).classes] == ["cat"]


def test_sub_folders_of_images_in_a_class_folder_are_refused_not_left_out(class_folder):
    """Before: only a class folder's own files were listed; circle/big/*.png was left out without a word (and a
    class folder holding only sub-folders was said to have no images)."""
    (class_folder / "circle" / "big").mkdir()
    shape_image("circle", (64, 64)).save(class_folder / "circle" / "big" / "0.png")
    (class_folder / "square" / ".ipynb_checkpoints").mkdir()  # hidden, and no images: not refused
    assert listing_error(class_folder) == (
        f"class folder '{class_folder / 'circle'}' has sub-folders of images (big), which would not be read: a class's "
        f"images are the files directly in its folder. Move them up into '{class_folder / 'circle'}', or make each "
        f"sub-folder a class folder of its own")


def test_a_file_in_an_unlisted_format_under_an_image_name_is_unreadable(class_folder):
    """Before: Pillow decoded whatever the content was, so a .png that is really a TGA (or an EPS, which Pillow
    hands to Ghostscript) was read by a decoder outside the listed types. A JPEG named .png is still read."""
    shape_image("circle", (16, 16)).save(class_folder / "circle" / "jpeg.png", "JPEG")
    shape_image("circle", (16, 16)).save(class_folder / "circle" / "targa.png", "TGA")
    config = DataConfig(name="", path=str(class_folder), image_size=16, holdout_fraction=0.0, on_bad_image="error")
    with pytest.raises(DatasetError) as error:
        load_split(config, "all")
    assert str(error.value) == (f"1 image(s) cannot be read: targa.png (cannot identify image file "
                                f"'{class_folder / 'circle' / 'targa.png'}'). Fix or remove them, or set "
                                f"data.on_bad_image=skip to train without them")
    (class_folder / "circle" / "targa.png").unlink()
    assert len(load_split(config, "all")) == 19


def test_float_images_with_nan_or_infinite_pixels_are_bad_images(class_folder):
    """np.uint8 of NaN is 0: a float TIFF of NaNs became an all-black training image, with only numpy's warning."""
    Image.fromarray(np.full((20, 20), np.nan, np.float32), "F").save(class_folder / "circle" / "nan.tif")
    one_inf = np.full((20, 20), 128.0, np.float32)
    one_inf[3, 4] = np.inf
    Image.fromarray(one_inf, "F").save(class_folder / "square" / "inf.tif")
    config = DataConfig(name="", path=str(class_folder), image_size=16, holdout_fraction=0.0)
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable image\(s\): nan.tif, inf.tif"):
        dataset = load_split(config, "train")
    assert len(dataset) == 18 and sorted(Path(s).name for s in dataset.bad_images) == ["inf.tif", "nan.tif"]
    config.on_bad_image = "error"
    with pytest.raises(DatasetError, match=r"2 image\(s\) cannot be read: nan.tif \(400 of its 400 pixels are NaN or "
                                           r"infinite\); inf.tif \(1 of its 400 pixels are NaN or infinite\)"):
        load_split(config, "train")


def test_float_images_scaled_to_one_are_read_as_such():
    """A float image in [0, 1] (numpy, scikit-image) was read as if 1.0 were 1/255: near-black pixels."""
    unit = np.array([[0.0, 0.5, 1.0, 0.25]], np.float32)
    assert np.asarray(to_mode(Image.fromarray(unit, "F"), 1)).tolist() == [[0, 127, 255, 63]]
    assert np.asarray(to_mode(Image.fromarray(unit * 255, "F"), 1)).tolist() == [[0, 127, 255, 63]]  # 0-255 floats too


def test_the_fingerprint_sees_a_swapped_image_of_the_same_size_and_mtime(class_folder):
    config = DataConfig(name="", path=str(class_folder), image_size=16)
    before = ImageDataset(config, "all").fingerprint()
    a, b = class_folder / "circle" / "000.png", class_folder / "circle" / "001.png"
    stat = os.stat(a)
    swapped = np.asarray(Image.open(a)).copy()
    swapped[0, 0] = 255 - swapped[0, 0]  # one pixel changed, the old mtime put back
    Image.fromarray(swapped).save(a)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ImageDataset(config, "all").fingerprint() != before


def test_a_file_name_that_is_not_utf8_is_fingerprinted(class_folder):
    """Before: str.encode refused the name (a Latin-1 'café' from an old archive, which Python holds with a
    surrogate), so train-vae and encode-dataset crashed with UnicodeEncodeError after reading every image."""
    config = DataConfig(name="", path=str(class_folder), image_size=16)
    before = ImageDataset(config, "all").fingerprint()
    latin1 = os.fsencode(class_folder / "circle") + b"/caf\xe9.png"
    shutil.copy(class_folder / "circle" / "000.png", latin1)
    with_it = ImageDataset(config, "all").fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", with_it) and with_it != before
    shape_image("square", (16, 16)).save(os.fsdecode(latin1))
    assert ImageDataset(config, "all").fingerprint() not in (before, with_it)


def test_a_file_without_read_permission_is_skipped_and_fingerprinted(class_folder, monkeypatch):
    """Before: the scan skipped it as unreadable, then the fingerprint opened it again and train-vae and
    encode-dataset crashed with PermissionError. (Opening is refused by a patch: the tests may run as root.)"""
    locked, real_open = class_folder / "circle" / "002.png", open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    config = DataConfig(name="", path=str(class_folder), image_size=16, holdout_fraction=0.0)
    readable = load_split(config, "all").fingerprint()
    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.warns(UserWarning, match=r"^skipping 1 unreadable image\(s\): 002.png$"):
        dataset = load_split(config, "all")
    assert len(dataset) == 17 and dataset.fingerprint() != readable
    monkeypatch.undo()
    assert load_split(config, "all").fingerprint() == readable


# ---- writes: strict JSON, modes, full disks ---------------------------------------------------------


def test_json_results_never_hold_nan(tmp_path):
    text = write_json(tmp_path / "eval.json", {"accuracy": float("nan"), "per_class": [1.0, float("inf")]})
    assert json.loads(text) == {"accuracy": None, "per_class": [1.0, None]}
    json.loads((tmp_path / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_written_files_get_the_umasks_mode(tiny_run):
    expected = 0o666 & ~common.checkpoint._umask()
    files = [*(tiny_run / "unet").iterdir(), *(tiny_run / "vae").iterdir(), *(tiny_run / "latents").iterdir(),
             *(tiny_run / "train_state" / "ldm").iterdir()]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(expected) for f in files}


def test_safetensors_write_errors_are_clear_and_keep_the_previous_file(tmp_path, monkeypatch):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)})

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(common.checkpoint, "save_file", full)
    with pytest.raises(CheckpointWriteError, match=r"could not save .*a.safetensors': the write failed .*is the disk full\?\)"):
        save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    with pytest.raises(CheckpointWriteError, match="is the disk full"):
        with common.checkpoint.atomic_directory(tmp_path / "vae"):
            raise SafetensorError("Error while serializing: IoError(No space left on device)")


def test_evaluate_on_a_run_with_no_model_yet_says_what_to_run(tmp_path):
    from pipelines.evaluate import main as evaluate_main

    train_vae(tiny_config(tmp_path / "run", "vae.max_steps=1"))
    with pytest.raises(RunFolderError, match=r"is not a finished run \(no model_index.json\); train it with `train-ldm`"):
        evaluate_main(tiny_config(tmp_path / "run"))


def test_near_copy_rate_on_a_few_training_images():
    from pipelines.quality import near_copy_rate

    train = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert near_copy_rate(train[:2].clone(), train) == 1.0  # 4 neighbours instead of 50
    assert math.isnan(near_copy_rate(train[:1], train[:1]))


# ---- scripts/quickstart.py, scripts/font_digits.py --------------------------------------------------------------


def load_script(name: str, folder: str = "scripts"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["configs/nope.yaml"], "config file 'configs/nope.yaml' not found; the shipped ones are in configs/"),
    ([str(TINY), "--set", "foo.bar=1"], "unknown config key 'foo'; known keys here: clip, data, deterministic, encode, evaluate, ldm, "
                                        "run_dir, sample, seed, text_encoder, vae"),
])
def test_quickstart_refuses_a_bad_config_or_override_in_one_line_before_any_stage(argv, message, capsys):
    """Before: a traceback (the config was read outside the commands' error handling)."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("quickstart").main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("where", ["run", "run/logs"])
def test_quickstart_refuses_a_file_where_its_run_folder_goes_before_any_stage(tmp_path, monkeypatch, where, capsys):
    """Before: side by side (2+ threads, no CUDA) it made run/logs/ for train-clip's output before any stage had
    checked the run folder, and stopped with a NotADirectoryError traceback."""
    quickstart = load_script("quickstart")
    monkeypatch.setattr(quickstart.torch, "get_num_threads", lambda: 2)  # the side-by-side path, as on 2 cores
    for name in ("train_clip", "train_vae"):
        monkeypatch.setattr(quickstart, name, lambda args: pytest.fail("a stage ran"))
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main([str(TINY), "--run", str(tmp_path / "run")])
    message = (f"run_dir '{tmp_path / 'run'}' is a file, not a folder; choose another path" if where == "run" else
               f"the train-clip stage's folder '{tmp_path / 'run/logs'}' is a file, not a folder; move it out of the way, "
               f"or choose another run_dir")
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_quickstart_says_why_train_clip_failed_beside_train_vae(tmp_path, monkeypatch, capsys):
    """Before: 'train-clip failed (exit code 2); its output is in run/logs/train-clip.out' (exit status 1): the reason
    (a resume refused, a lock held...) was only in that log. Now its error line, with status 2 as the commands exit."""
    quickstart = load_script("quickstart")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the spawned train-clip process imports quickstart by name
    monkeypatch.setitem(__import__("sys").modules, "quickstart", quickstart)  # and pickles run_in_child by that name
    monkeypatch.setattr(quickstart, "train_vae", lambda args: None)
    log = tmp_path / "logs" / "train-clip.out"
    with pytest.raises(SystemExit) as exit_info:  # a config train-clip refuses at once, as it would a held lock
        quickstart.stage_one_side_by_side(["--config", str(tmp_path / "nope.yaml")], str(tmp_path))
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: config file '{tmp_path / 'nope.yaml'}' not found; the shipped ones are in configs/ "
        f"(train-clip's output: {log})\n")


def test_quickstart_help_tells_its_own_arguments(monkeypatch, capsys):
    """Before: --help showed the commands' parser described as 'quickstart', with --config required, and neither
    the CONFIG it takes first nor --sequential."""
    monkeypatch.setattr("sys.argv", ["quickstart.py"])
    monkeypatch.setenv("COLUMNS", "200")  # one line of usage
    with pytest.raises(SystemExit) as exit_info:
        load_script("quickstart").main(["--help"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert exit_info.value.code == 0 and lines[:3] == [
        "usage: quickstart.py [-h] [--config CONFIG] [--run RUN] [--set KEY=VALUE] [--dry-run] [--sequential | --side-by-side] "
        "[CONFIG]", "",
        "The main job: every stage of a config, in order, with the wall time of each."]
    assert "CONFIG           the config of every stage (default: configs/mnist.yaml)" in lines
    assert "--sequential     train-clip, then train-vae (else side by side on a CPU)" in lines
    assert "--side-by-side   train-clip beside train-vae on a GPU too" in lines


@pytest.mark.parametrize("sequential, side_by_side, cuda, threads, wanted", [
    (False, False, False, 2, True), (False, False, False, 1, False), (True, False, False, 2, False),
    (False, False, True, 16, False), (False, True, True, 16, True), (False, True, False, 1, True)])
def test_quickstart_runs_stage_one_side_by_side_on_a_cpu_and_on_a_gpu_when_asked(sequential, side_by_side, cuda,
                                                                                  threads, wanted):
    quickstart = load_script("quickstart")
    assert quickstart.stage_one_side_by_side_wanted(sequential, side_by_side, cuda, threads) is wanted


def test_quickstart_refuses_sequential_and_side_by_side_together(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("quickstart").main([str(TINY), "--sequential", "--side-by-side"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        ": error: argument --side-by-side: not allowed with argument --sequential")


def test_quickstart_refuses_two_configs(monkeypatch, capsys):
    """Before: the --config given last won, silently (here the 8-minute MNIST quickstart instead of tiny)."""
    quickstart = load_script("quickstart")
    for name in ("train_clip", "train_vae", "encode_dataset", "train_ldm", "evaluate", "generate", "stage_one_side_by_side"):
        monkeypatch.setattr(quickstart, name, lambda *args: pytest.fail("a stage ran"))
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main([str(TINY), "--config", "configs/mnist.yaml"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: give the config once: {TINY} or --config configs/mnist.yaml")


def test_quickstart_draws_held_out_captions_of_a_caption_dataset(jsonl_folder, tmp_path, monkeypatch):
    """Before: on a metadata.jsonl dataset (no classes) every stage trained, then its last one, `generate
    --all-classes`, stopped with '--all-classes needs a class dataset', without the wall times or the grid."""
    quickstart = load_script("quickstart")
    calls = {}
    for name in ("train_clip", "train_vae", "encode_dataset", "train_ldm", "evaluate", "generate"):
        monkeypatch.setattr(quickstart, name, lambda args, name=name: calls.setdefault(name, args))
    run = tmp_path / "run"
    quickstart.main([str(TINY), "--run", str(run), "--set", "data.name=", "--set", f"data.path={jsonl_folder}",
                     "--set", "data.max_per_class=0", "--sequential"])
    generate_args = calls["generate"]
    assert generate_args[generate_args.index("--num"):] == [
        "--num", "8", "--out", f"{run}/samples/quickstart", "a bright square number 10", "a bright triangle number 11",
        "--overwrite"]


@pytest.mark.parametrize("form", ["--set=run_dir={}", "--run {}"])
def test_quickstart_reads_the_run_dir_as_its_commands_do(tmp_path, monkeypatch, form):
    """Before: `--set=run_dir=X` and `--run X` trained into X but wrote the grid and train-clip's log into
    checkpoints/<config name>, the run_dir quickstart itself read only from `--set X` pairs."""
    quickstart = load_script("quickstart")
    calls = {}
    for name in ("train_clip", "train_vae", "encode_dataset", "train_ldm", "evaluate", "generate"):
        monkeypatch.setattr(quickstart, name, lambda args, name=name: calls.setdefault(name, args))
    run = tmp_path / "run"
    quickstart.main([str(TINY), *form.format(run).split(), "--sequential"])
    assert calls["generate"][-6:] == ["--num", "8", "--out", f"{run}/samples/quickstart", "--all-classes", "--overwrite"]
    assert not (ROOT / "checkpoints" / "tiny").exists()


def test_font_digits_never_replaces_a_digit_already_in_its_folder(tmp_path, capsys):
    """Before: scripts/font_digits.py into the user's own digits folder (the README's "or your own folder")
    silently replaced their zero/0000.png & co with font renders."""
    mine = tmp_path / "my_digits" / "zero" / "0000.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own zero")
    with pytest.raises(SystemExit) as exit_info:
        load_script("font_digits").main([str(tmp_path / "my_digits"), "--per-class", "2"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(  # after argparse's prog
        f": error: {tmp_path / 'my_digits'} already holds {mine}, which this would replace; "
        f"choose another OUT, or remove those files first")
    assert mine.read_bytes() == b"my own zero" and [p.name for p in tmp_path.rglob("*")] == ["my_digits", "zero", "0000.png"]


@pytest.mark.parametrize("per_class", ["0", "-3"])
def test_font_digits_refuses_no_digits_per_class_before_writing(tmp_path, per_class, capsys):
    """Before: it made ten empty class folders and printed "wrote 0 digits" (or "wrote -30 digits")."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("font_digits").main([str(tmp_path / "out"), "--per-class", per_class])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: --per-class must be at least 1 (got {per_class})")
    assert not (tmp_path / "out").exists()


def test_readme_images_refuses_an_mnist_folder_that_is_no_run_in_one_line(tmp_path, monkeypatch, capsys):
    """Before: a RunFolderError traceback."""
    images = load_script("readme_images")
    monkeypatch.setattr(images, "OUT", tmp_path / "images")
    with pytest.raises(SystemExit) as exit_info:
        images.main(["--mnist", str(tmp_path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: --mnist {tmp_path} is not a finished run (no model_index.json); the ready-made one is checkpoints/mnist")
    assert not (tmp_path / "images").exists()


def test_readme_images_refuses_a_named_run_it_would_leave_out(tmp_path, monkeypatch, capsys):
    """Before: a --letters (--devanagari, --finetune, --lora) folder without its model was skipped without a word,
    like the defaults that are not there: the README kept the old pictures while the rest were redrawn."""
    images = load_script("readme_images")
    monkeypatch.setattr(images, "OUT", tmp_path / "images")
    monkeypatch.setattr(images, "load_pipeline", lambda *a, **k: pytest.fail("a picture was drawn"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        images.main(["--letters", str(tmp_path / "typo")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: --letters {tmp_path / 'typo'} has no model_index.json, so its pictures could not be drawn; leave "
        f"--letters out, or name a folder that has one")


def wheelhouse(*argv: str) -> tuple[int, str]:
    """scripts/wheelhouse.py as `make wheelhouse` runs it (from the repository, with .venv's Python): (status, stderr)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/wheelhouse.py", *argv], cwd=ROOT, capture_output=True, text=True)
    return done.returncode, done.stderr


@pytest.mark.parametrize("argv", [[], ["3.12"], ["3.12", "manylinux_2_28_x86_64"]])
def test_wheelhouse_without_its_three_arguments_says_its_usage(argv):
    """Before: an IndexError traceback."""
    assert wheelhouse(*argv) == (1, "usage: python scripts/wheelhouse.py PYTHON_VERSION PLATFORM OUT, e.g. 3.12 "
                                    "manylinux_2_28_x86_64 wheelhouse (make wheelhouse WHEEL_PYTHON=... WHEEL_PLATFORM=... "
                                    "runs it)\n")


@pytest.mark.parametrize("platform", ["manylinux_2_28", "x86_64", "manylinux_2_28_x86-64", "manylinux_2_4_x86_64"])
def test_wheelhouse_refuses_a_platform_that_is_no_wheel_tag_before_downloading(tmp_path, platform):
    """Before: pip was asked for wheels of a platform no wheel has (every download failed, and each was retried alone
    to name it), or, for manylinux_2_4 (below manylinux's 2.5), with no --platform at all: this machine's wheels."""
    assert wheelhouse("3.12", platform, str(tmp_path / "wheels")) == (1, (
        f"make wheelhouse: WHEEL_PLATFORM={platform} is not a wheel platform tag; give one such as manylinux_2_28_x86_64 "
        f"(glibc 2.28 or newer on x86-64; `ldd --version` there tells the glibc), manylinux_2_17_aarch64, "
        f"macosx_11_0_arm64 or win_amd64\n"))
    assert not (tmp_path / "wheels").exists()


def test_wheelhouse_refuses_a_file_for_its_folder_in_one_line(tmp_path):
    """Before: a FileExistsError (or NotADirectoryError) traceback when the folder was made."""
    (tmp_path / "wheels").write_text("")
    assert wheelhouse("3.12", "manylinux_2_28_x86_64", str(tmp_path / "wheels")) == (
        1, f"make wheelhouse: WHEELHOUSE '{tmp_path / 'wheels'}' is a file, not a folder; choose another WHEELHOUSE\n")


def test_wheelhouse_says_to_install_everything_the_tests_import(tmp_path, monkeypatch, capsys):
    """Before: its closing line said `pip install ... latent-toolkit pytest`, without hypothesis, which tests/conftest.py
    imports: the README's step 3 names it, but a user who copied the script's line could not run the tests."""
    import runpy
    import subprocess
    import sys

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["wheelhouse.py", "3.12", "manylinux_2_28_x86_64", str(tmp_path)])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))  # no pip: nothing fetched
    try:
        runpy.run_path(str(ROOT / "scripts" / "wheelhouse.py"), run_name="__main__")
    except SystemExit:  # where .venv is not at constraints.txt's versions: said after the line checked here
        pass
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{tmp_path}/: 0 wheels, 0 MiB (Python 3.12, manylinux_2_28_x86_64; install with: python -m pip install --no-index "
        f"--find-links {tmp_path} latent-toolkit pytest hypothesis)")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_refuses_a_python_older_than_3_10_before_making_the_venv(tmp_path):
    """Before: `make setup` with an older PYTHON made .venv with it, then pip failed at torch ('no matching
    distribution', or 'ResolutionImpossible'), which did not say the Python was the problem."""
    import subprocess

    old_python = tmp_path / "python3.9"  # answers --version as Python 3.9 does, and fails the version check as it would
    old_python.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.9.18' && exit 0\nexit 1\n")
    old_python.chmod(0o755)
    done = subprocess.run(["make", "-s", "quickstart", f"PYTHON={old_python}", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines()[0] == (
        f"make setup: the project needs Python 3.10 or newer, and PYTHON={old_python} is Python 3.9.18; pass another, "
        f"e.g. make quickstart PYTHON=python3.12")
    assert not (tmp_path / "venv").exists()


# ---- benchmarks/benchmark.py ----------------------------------------------------------------------


def benchmark_error(argv: list[str], capsys) -> str:
    """The one-line error benchmark.py stops with (exit status 2, argparse's form), after checking nothing was measured."""
    benchmark = load_script("benchmark", "benchmarks")
    benchmark.matmul_peak_gflops = lambda device: pytest.fail("it started measuring")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    _, _, message = capsys.readouterr().err.splitlines()[-1].partition(": error: ")  # after argparse's prog name
    assert exit_info.value.code == 2
    return message


def test_benchmark_refuses_a_missing_config_in_one_line(tmp_path, capsys):
    """Before: a ConfigError traceback."""
    assert benchmark_error(["--config", "configs/nope.yaml", "--out", str(tmp_path / "r.json")], capsys) == (
        "config file 'configs/nope.yaml' not found; the shipped ones are in configs/")


@pytest.mark.parametrize("repeats", ["0", "-2"])
def test_benchmark_refuses_fewer_than_one_repeat_before_measuring(tmp_path, repeats, capsys):
    """Before: the matmul peak was measured, then the first measurement's child process stopped with
    ZeroDivisionError ("vae_train failed:" and its traceback)."""
    assert benchmark_error(["--repeats", repeats, "--out", str(tmp_path / "r.json")], capsys) == (
        f"--repeats must be at least 1 (got {repeats})")


def test_benchmark_refuses_an_out_it_could_not_write_before_measuring(tmp_path, capsys):
    """Before: it measured for minutes (~4 on 2 cores), then stopped with IsADirectoryError or
    NotADirectoryError when writing the results."""
    assert benchmark_error(["--out", str(tmp_path)], capsys) == (
        f"--out '{tmp_path}' is a folder, not a file; give a file name, e.g. --out {tmp_path / 'results.json'}")
    (tmp_path / "file").write_text("")
    assert benchmark_error(["--out", str(tmp_path / "file" / "r.json")], capsys) == (
        f"--out's folder '{tmp_path / 'file'}' is a file, not a folder; choose another path")


@pytest.mark.parametrize("where", ["config", "out"])
def test_encode_memory_refuses_a_bad_config_or_out_before_rendering(tmp_path, monkeypatch, where, capsys):
    """Before: benchmarks/encode_memory.py rendered 92,000 Devanagari glyphs (2.5 min on 2 cores) before its first
    child process found the missing config, and wrote --out (a folder here) only after every measurement."""
    import common.data.devanagari

    monkeypatch.setattr(common.data.devanagari, "render_dataset", lambda *a: pytest.fail("it started rendering"))
    argv = ["--config", "configs/nope.yaml", "--out", str(tmp_path / "m.json")] if where == "config" else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        load_script("encode_memory", "benchmarks").main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        ": error: config file 'configs/nope.yaml' not found; the shipped ones are in configs/" if where == "config" else
        f": error: --out '{tmp_path}' is a folder, not a file; give a file name, e.g. --out {tmp_path / 'encode_memory.json'}")


@pytest.mark.parametrize("run, message", [
    ("runs/none", "runs/none is not a finished run (no model_index.json); train it with `train-ldm`, or pass --run "
                  "checkpoints/mnist for the ready-made model"),
    ("checkpoints/mnist", "checkpoints/mnist holds the vae, ldm stage(s), trained with other settings than this "
     "letters_readers command's (data.augment.rotate_degrees: 5.0 -> 4.0; data.augment.translate: 0.06 -> 0.05; "
     "data.name: 'mnist' -> 'letters'; data.per_class: 2000 -> 180; from checkpoints/mnist/config.yaml to this command's). "
     "One run folder has one seed and one dataset, so that its config.yaml reproduces every stage: drop those overrides "
     "(or pass --config checkpoints/mnist/config.yaml), or use a new run_dir"),
])
def test_letters_readers_refuses_a_run_it_cannot_read_before_training_its_readers(run, message, monkeypatch, capsys):
    """Before: benchmarks/letters_readers.py trained a 2,000-step reader (minutes) before loading --run, so a
    missing run stopped with a RunFolderError traceback then, and an MNIST run (not the letters data of --config)
    was read as letters: numbers for prompts the model never learned."""
    monkeypatch.chdir(ROOT)
    readers = load_script("letters_readers", "benchmarks")
    monkeypatch.setattr(readers, "fit_classifier", lambda *a, **k: pytest.fail("a reader trained"))
    with pytest.raises(SystemExit) as exit_info:
        readers.main(["--run", run])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


@pytest.mark.parametrize("flags, message", [
    (["--per-class", "0"], "--per-class must be at least 1 (got 0)"),
    (["--guidance", "2.5", "nan"], "--guidance takes finite scales, e.g. --guidance 2.5 5.0 (got 2.5 nan)"),
])
def test_letters_readers_refuses_bad_sampling_flags_before_training_its_readers(flags, message, monkeypatch, capsys):
    """Before: both were found only when sampling, after both readers had trained (~10 min on 2 cores)."""
    monkeypatch.chdir(ROOT)
    readers = load_script("letters_readers", "benchmarks")
    monkeypatch.setattr(readers, "fit_classifier", lambda *a, **k: pytest.fail("a reader trained"))
    with pytest.raises(SystemExit) as exit_info:
        readers.main(["--run", "checkpoints/letters", *flags])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_evaluate_with_other_data_settings_than_the_run_is_refused_before_writing(tiny_run, tmp_path):
    """Before: it scored the run against another split (here held-out images it had trained on) and wrote that
    into run/eval.json (and, with evaluate.tune, the run's sampling defaults into model_index.json)."""
    from pipelines.evaluate import main as evaluate_main

    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock-*"))
    before = {name: (run / name).read_bytes() for name in ("model_index.json", "config.yaml")}
    with pytest.raises(RunFolderError) as error:
        evaluate_main(tiny_config(run, "data.holdout_fraction=0.5", "evaluate.tune=true"))
    assert str(error.value) == (
        f"{run} holds the vae, clip, encode, ldm stage(s), trained with other settings than this evaluate command's "
        f"(data.holdout_fraction: 0.2 -> 0.5; from {run / 'config.yaml'} to this command's). One run folder has one seed "
        f"and one dataset, so that its config.yaml reproduces every stage: drop those overrides (or pass --config "
        f"{run / 'config.yaml'}), or use a new run_dir")
    assert {name: (run / name).read_bytes() for name in before} == before and not (run / "eval.json").exists()
    evaluate_main(tiny_config(run, "seed=1", "data.augment.rotate_degrees=0"))  # these only draw samples, or train


def test_a_file_where_the_latent_cache_goes_is_refused_before_anything_is_written(tiny_run, tmp_path):
    """encode-dataset wrote config.yaml and encoded a shard before failing on a file named `latents`."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "latents")
    (run / "latents").write_text("not a folder")
    before = (run / "config.yaml").read_text()
    with pytest.raises(UserError) as error:
        encode_main(tiny_config(run, "encode.batch_size=16"))
    assert str(error.value) == (f"the encode stage's folder '{run / 'latents'}' is a file, not a folder; "
                                f"move it out of the way, or choose another run_dir")
    assert (run / "config.yaml").read_text() == before and (run / "latents").read_text() == "not a folder"
