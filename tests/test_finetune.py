"""Fine-tuning (`<stage>.init_from`) and LoRA (`ldm.lora_rank`), from the tiny run as the base."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.checkpoint import DamagedFileError, folder_fingerprint
from common.config import ConfigError
from common.config_yaml import load_config
from common.errors import RunFolderError, UserError
from conftest import ROOT, tiny_config
from ldm.encode import main as encode_main
from ldm.lora import BASE_DTYPES, BASE_KEY, LORA_FILE, base_fingerprint
from ldm.train import main as ldm_main
from ldm.train_clip import main as clip_main
from pipelines import LatentPipeline
from vae.train import main as vae_main


def reuse_base(run: Path, base: Path, *overrides: str):
    """A run on the base's data that keeps the base's VAE and text encoder as they are."""
    return tiny_config(run, f"text_encoder.pretrained={base}", f"vae.init_from={base}", "vae.max_steps=0",
                       f"ldm.init_from={base}", *overrides)


@pytest.fixture(scope="module")
def copied_base(tiny_run, tmp_path_factory) -> Path:
    """A run with the base's VAE copied untouched (vae.max_steps=0) and its latents encoded: what
    fine-tuning runs start from. Tests copy it."""
    run = tmp_path_factory.mktemp("copied") / "run"
    config = reuse_base(run, tiny_run)
    vae_main(config)
    encode_main(config)
    return run


def copy_run(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(".lock-*"))
    return destination


@pytest.fixture(scope="module")
def lora_run(copied_base, tiny_run, tmp_path_factory) -> Path:
    run = copy_run(copied_base, tmp_path_factory.mktemp("lora") / "run")
    ldm_main(reuse_base(run, tiny_run, "ldm.lora_rank=4", "ldm.lr=0.05", "ldm.max_steps=2"))
    return run


def test_a_lora_write_killed_mid_way_leaves_nothing_behind_the_next_run(copied_base, tiny_run, tmp_path):
    """Before: save_lora wrote into a '.lora-*' folder in the run that a killed process (kill -9) left behind for
    good, a partial LoRA file in it, whatever train-ldm ran next; the README says such leftovers are removed."""
    run = copy_run(copied_base, tmp_path / "run")
    leftover = run / f".{LORA_FILE}.x1y2z3.tmp"
    leftover.mkdir()
    (leftover / LORA_FILE).write_bytes(b"half a file")
    ldm_main(reuse_base(run, tiny_run, "ldm.lora_rank=2", "ldm.max_steps=1"))
    assert (run / LORA_FILE).is_file() and sorted(p.name for p in run.glob(".*") if ".lock-" not in p.name) == []


def test_an_untrained_vae_copy_is_the_base_vae(copied_base, tiny_run):
    assert folder_fingerprint(copied_base / "vae") == folder_fingerprint(tiny_run / "vae")  # scaling factor kept too


def test_a_bare_diffusers_model_folder_is_a_source_too(tiny_run, tmp_path):
    vae_main(tiny_config(tmp_path / "run", f"vae.init_from={tiny_run / 'vae'}", "vae.max_steps=0"))
    assert folder_fingerprint(tmp_path / "run" / "vae") == folder_fingerprint(tiny_run / "vae")


def test_lora_weights_load_into_the_base_pipeline_and_unload(lora_run, tiny_run):
    with safe_open(str(lora_run / LORA_FILE), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    # diffusers' format: unet.<module>.lora.down/up.weight on the attention projections only, rank 4
    assert keys and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert {k.split(".")[-4] for k in keys} == {"to_q", "to_k", "to_v", "0"}
    assert all(t.shape[0] == 4 for k, t in load_file(lora_run / LORA_FILE).items() if ".lora.down." in k)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == 4
    base = LatentPipeline.from_pretrained(tiny_run)
    tuned = LatentPipeline.from_pretrained(lora_run)  # the run itself: the UNet with the adapters merged
    for p in (base, tuned):
        p.set_progress_bar_config(disable=True)

    def draw(p):
        return p("Draw a six", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    before = draw(base)
    base.load_lora_weights(lora_run)
    with_lora = draw(base)
    assert abs(with_lora - before).max() > 1e-3  # the adapters changed something
    assert abs(with_lora - draw(tuned)).max() < 1e-4  # and exactly what the merged run does
    base.unload_lora_weights()
    assert (draw(base) == before).all()


def test_lora_records_its_base_and_is_refused_by_another_unet(lora_run, tiny_run):
    with safe_open(str(lora_run / LORA_FILE), "pt") as f:
        recorded = json.loads(f.metadata()[BASE_KEY])
    base = LatentPipeline.from_pretrained(tiny_run)
    assert recorded == {name: base_fingerprint(base.unet, dtype) for name, dtype in BASE_DTYPES.items()}
    other = LatentPipeline.from_pretrained(tiny_run)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)  # another UNet of the same shape: peft would take the adapters
    with pytest.raises(RunFolderError) as error:
        other.load_lora_weights(lora_run)
    assert str(error.value) == (
        f"the LoRA in {lora_run / LORA_FILE} was trained on another UNet than this pipeline's (its config.yaml: "
        f"ldm.init_from {tiny_run}): its adapters would change the images without meaning. Load it into the pipeline of "
        f"its base run (LatentPipeline.from_pretrained(<that run>)); if this pipeline's LoRA was fused, unfuse_lora() "
        f"first; or pass check_base=False to load it anyway")
    assert not other.get_list_adapters()  # nothing was loaded
    other.load_lora_weights(lora_run, check_base=False)
    assert other.get_list_adapters() == {"unet": ["default_0"]}
    # the base in bfloat16, and the base with these adapters already in it: still their base
    half = LatentPipeline.from_pretrained(tiny_run, torch_dtype=torch.bfloat16)
    half.load_lora_weights(lora_run)
    half.load_lora_weights(lora_run, adapter_name="again")
    assert half.get_list_adapters() == {"unet": ["default_0", "again"]}


def test_the_shipped_lora_loads_into_its_base_only():
    LatentPipeline.from_pretrained("checkpoints/mnist").load_lora_weights("checkpoints/mnist-lora")
    with pytest.raises(RunFolderError, match="was trained on another UNet than this pipeline's"):
        LatentPipeline.from_pretrained("checkpoints/letters").load_lora_weights("checkpoints/mnist-lora")


def test_lora_paths_with_tilde_load_and_a_missing_one_is_named(tmp_path, monkeypatch):
    """Before: `~/lora` was read as a Hugging Face Hub name and refused ('Repo id must use alphanumeric chars'),
    and a mistyped folder failed as a Hub lookup ('Repo id must be in the form ...', or offline: 'you must
    specify a weight_name')."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(ROOT / "checkpoints" / "mnist-lora", tmp_path / "lora")
    pipe = LatentPipeline.from_pretrained(ROOT / "checkpoints" / "mnist")
    pipe.load_lora_weights("~/lora")
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}
    for missing, named in (("~/lroa", tmp_path / "lroa"), (str(tmp_path / "lroa"), tmp_path / "lroa"),
                           ("checkpoints/mnist-lroa", "checkpoints/mnist-lroa")):
        with pytest.raises(FileNotFoundError) as error:
            pipe.load_lora_weights(missing, adapter_name="second")
        assert str(error.value) == (
            f"no LoRA folder or file '{named}' (and no LoRA of that name on the Hugging Face Hub or in its cache): pass "
            f"the folder that train-ldm with ldm.lora_rank wrote (it holds pytorch_lora_weights.safetensors), e.g. "
            f"pipe.load_lora_weights('checkpoints/mnist-lora')")
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}


def test_a_damaged_lora_file_is_named(tmp_path):
    """Before: a cut-short LoRA file failed with safetensors' bare 'Error while deserializing header: incomplete
    metadata, file not fully covered', naming no file."""
    whole = (ROOT / "checkpoints" / "mnist-lora" / LORA_FILE).read_bytes()
    (tmp_path / LORA_FILE).write_bytes(whole[:len(whole) // 2])
    pipe = LatentPipeline.from_pretrained(ROOT / "checkpoints" / "mnist")
    for check_base in (True, False):
        with pytest.raises(DamagedFileError) as error:
            pipe.load_lora_weights(tmp_path, check_base=check_base)
        assert str(error.value) == (f"{tmp_path / LORA_FILE} is damaged ({len(whole) // 2} bytes where its header describes "
                                    f"{len(whole)}: cut short, or not one whole file); re-run `train-ldm --config ...` to "
                                    f"write it again")
    assert not pipe.get_list_adapters()


def test_a_lora_with_a_nan_weight_is_refused(tmp_path):
    """Before: it loaded, and every image then failed with "sampling gave non-finite latents ... try fewer steps,
    another scheduler or a lower guidance scale", blaming the sampler."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ROOT / "checkpoints" / "mnist-lora" / LORA_FILE)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / LORA_FILE)
    pipe = LatentPipeline.from_pretrained(ROOT / "checkpoints" / "mnist")
    with pytest.raises(DamagedFileError) as error:
        pipe.load_lora_weights(tmp_path)
    assert str(error.value) == (f"{tmp_path / LORA_FILE} holds non-finite weights (NaN or infinity in {name}): the model "
                                f"diverged or the file was changed; re-run `train-ldm --config ...` to write it again")
    assert not pipe.get_list_adapters()


def test_a_model_that_is_not_a_lora_is_named(tmp_path):
    """Before: a UNet's own folder or weights file passed to load_lora_weights failed with diffusers' 'Invalid LoRA
    checkpoint. Make sure all LoRA param names contain `'lora'` substring.', naming no file."""
    unet = ROOT / "checkpoints" / "mnist" / "unet"
    pipe = LatentPipeline.from_pretrained(ROOT / "checkpoints" / "mnist")
    for source in (unet, unet / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(ValueError) as error:
            pipe.load_lora_weights(source)
        assert str(error.value) == (f"{unet / 'diffusion_pytorch_model.safetensors'} holds no LoRA adapters (its "
                                    f"tensors, such as 'conv_in.bias', are not named lora): pass the folder that "
                                    f"train-ldm with ldm.lora_rank wrote, which holds {LORA_FILE}")
    assert not pipe.get_list_adapters()


def own_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights, adapters left out, under their names without peft's `base_layer`."""
    return {k.replace(".base_layer.", "."): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


def test_fuse_unfuse_and_unload_give_back_the_base_bit_for_bit():
    """Before: peft's unfuse subtracted the adapters' product again, leaving the base's weights off by rounding
    (~1e-8): the base no longer hashed as the UNet its LoRA was trained on, so loading that LoRA again was refused
    as 'trained on another UNet', though the message says to unfuse first."""
    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    base = own_weights(pipe.unet)
    pipe.load_lora_weights("checkpoints/mnist-lora", adapter_name="a")
    pipe.load_lora_weights("checkpoints/mnist-lora", adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.25])
    for _ in range(2):
        pipe.fuse_lora()
        assert any(not torch.equal(w, base[k]) for k, w in own_weights(pipe.unet).items())
        pipe.unfuse_lora()
        assert all(torch.equal(w, base[k]) for k, w in own_weights(pipe.unet).items())
    pipe.load_lora_weights("checkpoints/mnist-lora", adapter_name="c")  # still its base
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_a_lora_baked_in_by_fuse_and_unload_stays_through_a_later_unfuse():
    """fuse_lora() then unload_lora_weights() bakes a LoRA into the weights (diffusers' way to drop peft's layers);
    an unfuse_lora() later, with nothing fused, must not bring back the weights from before the bake."""
    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    pipe.load_lora_weights("checkpoints/mnist-lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    baked = own_weights(pipe.unet)
    pipe.load_lora_weights("checkpoints/mnist-lora", adapter_name="b", check_base=False)
    pipe.unfuse_lora()
    assert all(torch.equal(w, baked[k]) for k, w in own_weights(pipe.unet).items())


def test_saving_with_adapters_loaded_is_refused_and_a_baked_lora_saves(tmp_path):
    """Before: save_pretrained with a LoRA loaded (fused or not) wrote peft's layers (base_layer, lora_A, ...) into
    unet/; from_pretrained loaded that folder leaving the attention weights uninitialized, and sampling failed with
    "RuntimeError: Tensor on device meta is not on the expected device cpu!"."""
    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights("checkpoints/mnist-lora")

    def draw(p):
        return p("Draw a six", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    with_lora = draw(pipe)
    for fused in (False, True):
        if fused:
            pipe.fuse_lora()
        with pytest.raises(ValueError, match=r"^LoRA adapters are loaded in this pipeline, and unet/ saved with them "
                                             r"could not be loaded again; to save the model with the LoRA merged in, "
                                             r"call pipe.fuse_lora\(\) and then pipe.unload_lora_weights\(\) first; to "
                                             r"save the base, pipe.unload_lora_weights\(\) alone$"):
            pipe.save_pretrained(tmp_path / "copy")
        assert not (tmp_path / "copy").exists()
    pipe.unload_lora_weights()  # after fuse_lora: the LoRA stays, baked into the weights
    pipe.save_pretrained(tmp_path / "copy")
    again = LatentPipeline.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert abs(draw(again) - with_lora).max() < 1e-5


def test_unfuse_gives_back_the_adapters_scale():
    """Before: fuse_lora(lora_scale=0.5) multiplied the adapters' scale by 0.5 for good: after unfuse_lora the LoRA
    drew at half strength, with nothing to say so."""
    pipe = LatentPipeline.from_pretrained("checkpoints/mnist")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights("checkpoints/mnist-lora")

    def draw():
        return pipe("Draw a six", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    before = draw()
    pipe.fuse_lora(lora_scale=0.5)
    assert abs(draw() - before).max() > 1e-2  # fused at half strength
    pipe.unfuse_lora()
    assert (draw() == before).all()


@pytest.mark.parametrize("config", [b"- a list\n", b"ldm: [1]\n", b"ldm:\n  init_from: [unclosed\n", b"\xff\xfe"])
def test_the_refusal_of_another_unet_survives_a_damaged_config_yaml(tmp_path, config):
    """Before: refusing a LoRA in another UNet's pipeline read the LoRA folder's config.yaml for its base, and a damaged
    or edited one turned the refusal into an unrelated AttributeError, YAML ParserError or UnicodeDecodeError."""
    shutil.copy(ROOT / "checkpoints" / "mnist-lora" / LORA_FILE, tmp_path)
    (tmp_path / "config.yaml").write_bytes(config)
    with pytest.raises(RunFolderError) as error:
        LatentPipeline.from_pretrained(ROOT / "checkpoints" / "letters").load_lora_weights(tmp_path)
    assert str(error.value) == (
        f"the LoRA in {tmp_path / LORA_FILE} was trained on another UNet than this pipeline's: its adapters would change "
        f"the images without meaning. Load it into the pipeline of its base run (LatentPipeline.from_pretrained(<that "
        f"run>)); if this pipeline's LoRA was fused, unfuse_lora() first; or pass check_base=False to load it anyway")


def test_a_renamed_lora_in_a_folder_is_checked_against_its_base(tmp_path):
    """Before: with the LoRA file renamed (my_style.safetensors, as LoRAs are shared), the base check looked for
    pytorch_lora_weights.safetensors only, found none, and let diffusers guess and load the file into another UNet."""
    shutil.copy(ROOT / "checkpoints" / "mnist-lora" / LORA_FILE, tmp_path / "my_style.safetensors")
    with pytest.raises(RunFolderError) as error:
        LatentPipeline.from_pretrained(ROOT / "checkpoints" / "letters").load_lora_weights(tmp_path)
    assert str(error.value) == (
        f"the LoRA in {tmp_path / 'my_style.safetensors'} was trained on another UNet than this pipeline's: its adapters "
        f"would change the images without meaning. Load it into the pipeline of its base run (LatentPipeline."
        f"from_pretrained(<that run>)); if this pipeline's LoRA was fused, unfuse_lora() first; or pass check_base=False "
        f"to load it anyway")
    base = LatentPipeline.from_pretrained(ROOT / "checkpoints" / "mnist")
    base.load_lora_weights(tmp_path)
    assert base.get_list_adapters() == {"unet": ["default_0"]}


def test_only_the_adapters_trained(lora_run, tiny_run):
    merged, original = load_file(lora_run / "unet" / "diffusion_pytorch_model.safetensors"), load_file(
        tiny_run / "unet" / "diffusion_pytorch_model.safetensors")
    assert merged.keys() == original.keys()  # a plain UNet: loads without peft
    changed = {k for k in merged if not torch.equal(merged[k], original[k])}
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") and "attn" in k for k in changed)


def test_a_full_fine_tune_over_a_lora_run_removes_its_lora_file(lora_run, tiny_run, tmp_path):
    """Before: a LoRA run trained again fully (its train_state/ldm deleted, ldm.lora_rank=0) kept the old
    pytorch_lora_weights.safetensors beside its new unet/, and load_lora_weights(run) loaded those stale adapters."""
    run = copy_run(lora_run, tmp_path / "run")
    shutil.rmtree(run / "train_state" / "ldm")
    ldm_main(reuse_base(run, tiny_run, "ldm.max_steps=1"))
    assert not (run / LORA_FILE).exists()
    with pytest.raises(RunFolderError) as error:
        LatentPipeline.from_pretrained(tiny_run).load_lora_weights(run)
    assert str(error.value) == (f"no LoRA weights in safetensors in {run} (it holds no weights; pickled weights are never "
                                f"unpickled): pass the folder that train-ldm with ldm.lora_rank wrote, which holds {LORA_FILE}")


def test_full_fine_tune_starts_from_the_base_unet(copied_base, tiny_run, tmp_path):
    run = copy_run(copied_base, tmp_path / "run")
    ldm_main(reuse_base(run, tiny_run, "ldm.max_steps=0", "ldm.block_out_channels=[16, 16]"))
    assert folder_fingerprint(run / "unet") == folder_fingerprint(tiny_run / "unet")
    # the architecture comes from the base, and the saved config says so
    saved = load_config(run / "config.yaml")
    assert saved.ldm.block_out_channels == tiny_config(tiny_run).ldm.block_out_channels == [32, 32]


def test_clip_fine_tune_keeps_the_base_tokenizer(tiny_run, tmp_path):
    clip_main(tiny_config(tmp_path / "run", f"clip.init_from={tiny_run}", "clip.max_steps=1", "clip.text_hidden=64"))
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == (tiny_run / "tokenizer" / "tokenizer.json").read_bytes()
    assert load_config(tmp_path / "run" / "config.yaml").clip.text_hidden == tiny_config(tiny_run).clip.text_hidden


def test_bad_init_sources_are_refused_before_anything_is_written(tiny_run, tmp_path):
    run = tmp_path / "run"
    cases = [
        (vae_main, [f"vae.init_from={tmp_path / 'nowhere'}"],
         f"vae.init_from='{tmp_path / 'nowhere'}' is not a folder; point it at a run folder, or at a diffusers-format "
         f"vae folder (config.json and safetensors weights)"),
        (vae_main, [f"vae.init_from={tiny_run / 'unet'}"],
         f"vae.init_from: {tiny_run / 'unet' / 'config.json'} describes a UNet2DConditionModel, not a AutoencoderKL; "
         f"point vae.init_from at the vae of a run"),
        (vae_main, [f"vae.init_from={tiny_run}", "data.channels=3"],
         f"vae.init_from: the VAE in {tiny_run / 'vae'} takes 1-channel images, but data.channels is 3; "
         f"set data.channels=1 or start from another VAE"),
        (clip_main, [f"clip.init_from={tiny_run}", "data.image_size=32"],
         f"clip.init_from: the CLIP in {tiny_run / 'clip'} sees 16x16x1 images, but this run's are 32x32x1 "
         f"(data.image_size, data.channels); its position embeddings fit one size only"),
    ]
    for main, overrides, message in cases:
        with pytest.raises(UserError) as error:
            main(tiny_config(run, *overrides))
        assert str(error.value) == message
        assert not (run / "vae").exists() and not (run / "clip").exists()


def test_damaged_init_from_weights_are_named_before_anything_is_written(copied_base, tiny_run, tmp_path):
    """Before: a cut-short base model failed in diffusers with 'Unable to load weights from checkpoint file for ...'
    (in transformers, for clip.init_from, with safetensors' bare 'incomplete metadata, file not fully covered'),
    saying neither what was wrong with it nor what writes it."""
    damaged = copy_run(tiny_run, tmp_path / "damaged")
    run = copy_run(copied_base, tmp_path / "run")
    for component, main, command, config in (
            ("vae", vae_main, "train-vae", tiny_config(tmp_path / "other", f"vae.init_from={damaged}")),
            ("clip", clip_main, "train-clip", tiny_config(tmp_path / "other", f"clip.init_from={damaged}")),
            ("unet", ldm_main, "train-ldm", tiny_config(run, f"text_encoder.pretrained={tiny_run}",
                                                         f"vae.init_from={tiny_run}", "vae.max_steps=0",
                                                         f"ldm.init_from={damaged}"))):
        weights = next((damaged / component).glob("*.safetensors"))
        size = weights.stat().st_size
        os.truncate(weights, size // 2)
        with pytest.raises(DamagedFileError) as error:
            main(config)
        assert str(error.value) == (f"{weights} is damaged ({size // 2} bytes where its header describes {size}: cut "
                                    f"short, or not one whole file); re-run `{command} --config ...` to write it again")
    assert not any((tmp_path / "other" / name).exists() for name in ("vae", "clip")) and not (run / "unet").exists()


def test_a_unet_trained_with_another_prediction_type_is_refused(copied_base, tiny_run, tmp_path):
    run = copy_run(copied_base, tmp_path / "run")
    with pytest.raises(UserError) as error:
        ldm_main(reuse_base(run, tiny_run, "ldm.prediction_type=epsilon"))
    assert str(error.value) == (
        f"ldm.init_from: the UNet in {tiny_run / 'unet'} was trained with prediction_type='v_prediction' "
        f"({tiny_run / 'scheduler' / 'scheduler_config.json'}), but ldm.prediction_type is 'epsilon'; "
        f"set ldm.prediction_type=v_prediction")
    assert not (run / "unet").exists()


@pytest.mark.parametrize("unet_folder", [False, True])
def test_lora_needs_a_base_and_its_vae(tiny_run, tmp_path, unet_folder):
    """Before: with ldm.init_from naming the base run's unet/ itself, the base's vae/ and text_encoder/ were not
    looked for beside it, and adapters were trained for another VAE than the base pipeline decodes with."""
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path, "ldm.lora_rank=4")
    assert str(error.value) == ("config key 'ldm.lora_rank' (4) adapts a trained UNet: set ldm.init_from to its run "
                                "folder, or ldm.lora_rank=0")
    run = tmp_path / "run"
    config = tiny_config(run, f"ldm.init_from={tiny_run / 'unet' if unet_folder else tiny_run}", "ldm.lora_rank=4",
                         f"text_encoder.pretrained={tiny_run}", "vae.max_steps=1")
    vae_main(config)  # a VAE trained one step further: no longer the base's
    encode_main(config)
    with pytest.raises(UserError) as error:
        ldm_main(config)
    assert str(error.value) == (
        f"ldm.lora_rank: this run's vae ({run / 'vae'}) differs from the base's ({tiny_run / 'vae'}), so the adapters "
        f"would not fit the base pipeline they load into. Use the base's vae unchanged (vae.init_from={tiny_run} with "
        f"vae.max_steps=0), or fine-tune fully (ldm.lora_rank=0)")
    assert not (run / "unet").exists() and not (run / LORA_FILE).exists()


@pytest.mark.parametrize("stage, main, inside", [("vae", vae_main, ""), ("clip", clip_main, "clip"), ("ldm", ldm_main, "unet")])
def test_init_from_the_run_being_trained_is_refused_before_anything_is_written(tiny_run, tmp_path, stage, main, inside):
    """Before: with the stage's train_state deleted (as the resume refusal suggests), the stage fine-tuned its
    own weights in place: the base was overwritten and config.yaml's init_from named the fine-tuned weights."""
    run = copy_run(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "train_state" / stage)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".lock-")}
    source = run / inside if inside else run
    with pytest.raises(UserError) as error:
        main(tiny_config(run, f"{stage}.init_from={source}", f"{stage}.max_steps=1"))
    assert str(error.value) == (f"{stage}.init_from='{source}' is inside this run's own folder ({run}): training would "
                                f"replace the weights it starts from. Fine-tune into a new run: --set run_dir=NEW "
                                f"--set {stage}.init_from={run}")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".lock-")} == before
