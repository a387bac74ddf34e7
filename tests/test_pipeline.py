import json
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, PNDMScheduler, StableDiffusionPipeline)

from common.errors import RunFolderError, UserError
from conftest import ROOT, tiny_config
from pipelines import LatentPipeline
from pipelines.generate import cli as generate_cli, slug


def run_pipe(pipe, prompt="Draw a six", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_prompt_in_pil_image_of_the_configured_size_out(pipe):
    image = run_pipe(pipe)[0]
    assert isinstance(image, PIL.Image.Image)
    assert image.size == (16, 16) and image.mode == "L"


def test_seeded_generation_is_deterministic_and_seeds_differ(pipe):
    a = run_pipe(pipe, output_type="np", seed=1)
    b = run_pipe(pipe, output_type="np", seed=1)
    c = run_pipe(pipe, output_type="np", seed=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_scale_one_is_the_conditional_prediction_alone(pipe):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_prompt(["Draw a six"], "cpu", 1, False)[0]
    t = pipe.scheduler.timesteps[0] if pipe.scheduler.timesteps is not None else torch.tensor(999)
    conditional = pipe.unet(noise, t, encoder_hidden_states=text).sample
    guided, negative = pipe.encode_prompt(["Draw a six"], "cpu", 1, True)
    at_one = pipe.predict_noise(noise, t, guided, negative, guidance_scale=1.0)
    assert torch.allclose(at_one, conditional, atol=1e-5)
    # and the pipeline skips the unconditional half altogether at <= 1
    a = run_pipe(pipe, output_type="np", guidance_scale=1.0, latents=noise)
    b = run_pipe(pipe, output_type="np", guidance_scale=0.5, latents=noise)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("scheduler_class", [None, EulerAncestralDiscreteScheduler])
def test_a_list_of_generators_makes_each_image_what_its_seed_gives_alone(pipe, scheduler_class):
    """diffusers' convention, documented in README: in a batch or with num_images_per_prompt, image i comes from
    generator i as it would alone (stochastic schedulers draw their step noise per image too), up to rounding."""
    original = pipe.scheduler
    try:
        if scheduler_class is not None:
            pipe.scheduler = scheduler_class.from_config(original.config)
        gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
        kwargs = {"output_type": "np", "num_inference_steps": 3, "guidance_scale": 2.0}
        six, seven = pipe("Draw a six", generator=gen(3), **kwargs).images, pipe("Draw a 7", generator=gen(4), **kwargs).images
        batch = pipe(["Draw a 7", "Draw a six"], generator=[gen(4), gen(3)], **kwargs).images
        per_prompt = pipe("Draw a six", num_images_per_prompt=2, generator=[gen(5), gen(3)], **kwargs).images
        assert np.allclose(batch[0], seven[0], atol=1e-5) and np.allclose(batch[1], six[0], atol=1e-5)
        assert np.allclose(per_prompt[1], six[0], atol=1e-5) and not np.allclose(per_prompt[0], six[0], atol=1e-2)
    finally:
        pipe.scheduler = original


def test_a_list_of_prompts_and_several_images_each(pipe):
    images = run_pipe(pipe, ["Draw a six", "Draw a 7", ""], num_images_per_prompt=2, output_type="pt")
    assert images.shape == (6, 1, 16, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0
    single = run_pipe(pipe, "Draw a 7", num_images_per_prompt=2, output_type="pt", seed=0)
    assert not torch.equal(images[:2], single)  # different prompts, different images


def test_save_and_reload_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    again = LatentPipeline.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(run_pipe(pipe, output_type="np"), run_pipe(again, output_type="np"))


def test_saving_pickles_is_refused_before_anything_is_written(pipe, tmp_path):
    """Before: every component was written as a pickled .bin, then folder_fingerprint failed with "no weights
    (*.safetensors) in .../unet; train that stage first", leaving a model_index.json with the source's hashes and a
    folder that from_pretrained refuses."""
    with pytest.raises(ValueError, match=r"^LatentPipeline saves its weights as safetensors only \(from_pretrained never "
                                         r"unpickles .bin files, so it could not load what safe_serialization=False "
                                         r"writes\); leave safe_serialization out$"):
        pipe.save_pretrained(tmp_path / "copy", safe_serialization=False)
    assert not (tmp_path / "copy").exists()


def test_save_and_from_pretrained_expand_home_and_a_file_in_the_way_is_named(pipe, tmp_path, monkeypatch):
    """Before: save_pretrained("~/copy") wrote a folder named '~' in the working directory, and a file in the way gave
    NotADirectoryError on its vae/."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    pipe.save_pretrained("~/copy")
    assert (tmp_path / "copy" / "model_index.json").is_file() and not (tmp_path / "~").exists()
    # and read back from there: before, HFValidationError "Repo id must use alphanumeric chars ... '~/copy'"
    assert LatentPipeline.from_pretrained("~/copy").config.sampling == pipe.config.sampling
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=f"^save_directory '{tmp_path / 'file'}' is a file, not a folder; choose another path$"):
        pipe.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_pipeline_saved_in_half_precision_loads_and_samples(tiny_run, tmp_path):
    """Before: a pipeline saved in fp16 loaded with its text encoder in fp16 (transformers keeps the saved dtype)
    and its UNet in fp32 (diffusers' default), and sampling failed with "RuntimeError: mat1 and mat2 must have the
    same dtype, but got Half and Float"; so did from_pretrained(run, torch_dtype={"unet": torch.float16, ...})."""
    LatentPipeline.from_pretrained(tiny_run, torch_dtype=torch.float16).save_pretrained(tmp_path / "half")
    again = LatentPipeline.from_pretrained(tmp_path / "half")
    assert (again.text_encoder.dtype, again.unet.dtype) == (torch.float16, torch.float32)
    mixed = LatentPipeline.from_pretrained(tiny_run, torch_dtype={"unet": torch.float16, "default": torch.float32})
    for loaded in (again, mixed):
        loaded.set_progress_bar_config(disable=True)
        assert np.isfinite(run_pipe(loaded, output_type="np", num_inference_steps=2)).all()


def test_saving_a_loaded_pipeline_over_its_run_leaves_its_models_as_they_were(tiny_run, tmp_path):
    """Before: save_pretrained wrote the source's path ("_name_or_path") into vae/ and unet/ config.json, so saving an
    unchanged pipeline over its own run changed the VAE's hash, and train-ldm then refused the run's latent cache:
    "the latent cache ... was made with a different VAE (the VAE was retrained since)"."""
    from common.checkpoint import folder_fingerprint

    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = {name: folder_fingerprint(run / name) for name in ("vae", "unet", "text_encoder")}
    LatentPipeline.from_pretrained(run).save_pretrained(run)
    assert {name: folder_fingerprint(run / name) for name in before} == before


def test_saving_unsharded_over_a_sharded_save_loads(pipe, tmp_path):
    """Before: the sharded save's index stayed beside the new unsharded weights, and from_pretrained failed with
    "FileNotFoundError: .../unet/ does not appear to have a file named ...-00001-of-0000N.safetensors which is required
    according to the checkpoint index"."""
    pipe.save_pretrained(tmp_path / "copy", max_shard_size="20KB")
    assert (tmp_path / "copy" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    pipe.save_pretrained(tmp_path / "copy")
    assert not list((tmp_path / "copy").glob("*/*.index.json"))
    again = LatentPipeline.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(run_pipe(pipe, output_type="np"), run_pipe(again, output_type="np"))


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                                             KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, PNDMScheduler])
def test_a_swapped_scheduler_runs(pipe, scheduler_class):
    """Heun before: "HeunDiscreteScheduler with 7 steps repeats 3 timestep(s) ... use fewer steps", at any steps > 1
    (a second-order scheduler lists its timesteps twice by design), so `generate --scheduler heun` never worked.
    KDPM2 before: "KDPM2DiscreteScheduler with 4 steps repeats -3 timestep(s) ... use fewer steps (e.g. 6)" (its second
    stages sit between two steps), PNDM: "PNDMScheduler with 13 steps repeats 6 timestep(s)" (its warm-up's repeats)."""
    original = pipe.scheduler
    try:
        pipe.scheduler = scheduler_class.from_config(original.config)
        images = run_pipe(pipe, output_type="np", num_inference_steps=4)
        assert images.shape == (1, 16, 16, 1) and np.isfinite(images).all()
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("name, message", [
    ("DDIMInverseScheduler", r"DDIMInverseScheduler runs from an image to noise \(to invert an image\), not from noise to an "
                             r"image; to sample, use the scheduler it inverts: pipe.scheduler = "
                             r"DDIMScheduler.from_config\(pipe.scheduler.config\)"),
    ("DPMSolverMultistepInverseScheduler", r"DPMSolverMultistepInverseScheduler runs from an image to noise .* "
                                           r"DPMSolverMultistepScheduler.from_config\(pipe.scheduler.config\)"),
    ("EDMEulerScheduler", r"EDMEulerScheduler is made for models trained on another noise schedule \(flow matching, "
                          r"EDM\), not this model's discrete-time one; use a scheduler that has it, e.g. pipe.scheduler "
                          r"= EulerDiscreteScheduler.from_config\(pipe.scheduler.config\) \(or DDIM, UniPC, DPM-Solver\+\+\)"),
    ("FlowMatchEulerDiscreteScheduler", r"FlowMatchEulerDiscreteScheduler is made for models trained on another noise "
                                        r"schedule .*"),
])
def test_a_scheduler_that_cannot_sample_the_model_is_refused(pipe, name, message):
    """Before: the inverse DPM-Solver and EDM Euler drew noise without a word, DDIM inverse said "linspace is not
    supported. Please make sure to choose one of 'leading' or 'trailing'" and flow matching "AttributeError:
    'FlowMatchEulerDiscreteScheduler' object has no attribute 'init_noise_sigma'"."""
    import diffusers

    original = pipe.scheduler
    try:
        pipe.scheduler = getattr(diffusers, name).from_config(original.config)
        with pytest.raises(ValueError, match=f"^{message}$"):
            run_pipe(pipe, num_inference_steps=2)
    finally:
        pipe.scheduler = original


def test_a_scheduler_made_without_the_models_config_is_refused(tiny_run, pipe, tmp_path):
    """Before: pipe.scheduler = EulerDiscreteScheduler() (diffusers' defaults: linear betas 1e-4..0.02, epsilon) on a
    model trained with others sampled noise without a word (checkpoints/mnist: v_prediction, scaled_linear)."""
    from diffusers import EulerDiscreteScheduler

    original = pipe.scheduler
    trained = {key: original.config[key] for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type")}
    default = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}
    differ = [key for key in trained if trained[key] != default[key]]
    assert differ  # the tiny run is trained on another schedule than diffusers' defaults
    try:
        pipe.scheduler = EulerDiscreteScheduler()
        message = "^" + re.escape(
            f"EulerDiscreteScheduler has {', '.join(f'{k}={default[k]!r}' for k in differ)}, but this model was "
            f"trained with {', '.join(f'{k}={trained[k]!r}' for k in differ)}: sampling on another noise schedule "
            f"or prediction type gives degraded images or noise; make it from the model's scheduler config "
            f"(pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config), before replacing it) "
            f"or pass those values") + "$"
        with pytest.raises(ValueError, match=message):
            run_pipe(pipe, num_inference_steps=2)
        # nor saved: reloaded, it would be the folder's own scheduler, and sampled noise without a word (before)
        with pytest.raises(ValueError, match=message):
            pipe.save_pretrained(tmp_path / "copy")
        assert not (tmp_path / "copy").exists()
        # nor passed to from_pretrained: it was taken as the run's own (before)
        given = LatentPipeline.from_pretrained(tiny_run, scheduler=EulerDiscreteScheduler())
        with pytest.raises(ValueError, match=message):
            run_pipe(given, num_inference_steps=2)
        with pytest.raises(ValueError, match=message):  # nor to from_pipe (before: taken as the UNet's own too)
            run_pipe(LatentPipeline.from_pipe(pipe, scheduler=EulerDiscreteScheduler()), num_inference_steps=2)
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config, timestep_spacing="trailing")
        assert np.isfinite(run_pipe(pipe, output_type="np", num_inference_steps=2)).all()  # sampling choices are free
    finally:
        pipe.scheduler = original


def test_a_pipeline_moved_to_the_meta_device_is_refused_before_sampling_or_saving(tiny_run, tmp_path):
    """Before: NotImplementedError "Cannot copy out of meta tensor; no data!" from the sampler's timestep check."""
    weightless = LatentPipeline.from_pretrained(tiny_run).to("meta")
    with pytest.raises(ValueError, match=r"^the pipeline is on the meta device \(its weights have shapes but no data, "
                                         r"e.g. after pipe.to\('meta'\)\), so it cannot sample; load it again, e.g. "
                                         r"LatentPipeline.from_pretrained\(run\)$"):
        run_pipe(weightless, num_inference_steps=2)
    # nor saved: before, vae/config.json was written, then "NotImplementedError: Cannot copy out of meta tensor"
    with pytest.raises(ValueError, match=r"^the pipeline's vae, text_encoder, unet are on the meta device \(weights with "
                                         r"shapes but no data, e.g. after pipe.to\('meta'\)\), so there is nothing to "
                                         r"save; load it again, e.g. LatentPipeline.from_pretrained\(run\), and save that$"):
        weightless.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_stock_stable_diffusion_pipeline_loads_the_run(tiny_run, pipe):
    stock = StableDiffusionPipeline.from_pretrained(tiny_run, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    ours = run_pipe(pipe, output_type="np")
    theirs = run_pipe(stock, output_type="np")
    assert theirs.shape == ours.shape
    assert np.allclose(theirs, ours, atol=1e-5)  # the same model, the same sampler, the same images


def test_bad_arguments_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("Draw a six", num_inference_steps=0)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe("Draw a six", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe("Draw a six", output_type="jpeg")
    with pytest.raises(ValueError, match="2 generators for 1 images"):
        pipe("Draw a six", generator=[torch.Generator().manual_seed(0)] * 2)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_images_per_prompt": 1.5}, ValueError, r"num_images_per_prompt must be a whole number >= 1, got 1.5"),
    ({"num_images_per_prompt": "2"}, ValueError, r"num_images_per_prompt must be a whole number >= 1, got '2'"),
    ({"num_inference_steps": 2.7}, ValueError, r"num_inference_steps must be a whole number >= 1 \(e.g. 20\), got 2.7"),
    ({"generator": 0}, TypeError, r"generator must be a torch.Generator \(e.g. torch.Generator\(\).manual_seed\(0\)\) "
                                  r"or a list of them, one per image; got int 0"),
    ({"negative_prompt": 3}, TypeError, r"negative_prompt must be a string or a list of strings \(one per prompt\), got 3"),
    ({"eta": float("nan")}, ValueError, r"eta must be a number in \[0, 1\] \(DDIM's: 0 is deterministic, 1 is as noisy as "
                                        r"DDPM\), got nan"),
    ({"eta": 5.0}, ValueError, r"eta must be a number in \[0, 1\]"),
    ({"guidance_rescale": -1.0}, ValueError, r"guidance_rescale must be a number in \[0, 1\] \(0: off; Lin et al. "
                                             r"suggest 0.7\), got -1.0"),
    ({"timesteps": [5000, 10]}, ValueError, r"timesteps must be whole numbers in \[0, 999\] \(the steps the model was "
                                            r"trained on\), strictly decreasing \(noisiest first\), e.g. \[999, 749, "
                                            r"499, 249\]; got \[5000, 10\]"),
    ({"timesteps": [10, 500]}, ValueError, r"timesteps must be .* got \[10, 500\]"),
    ({"timesteps": [-5, 3]}, ValueError, r"timesteps must be .* got \[-5, 3\]"),
    ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, ValueError,
     r"latents hold 256 NaN or infinite values of 256; pass finite starting noise \(e.g. torch.randn\), or none"),
], ids=["images-float", "images-text", "steps-float", "generator-int", "negative-int", "eta-nan", "eta-5", "rescale-neg",
        "timesteps-untrained", "timesteps-ascending", "timesteps-negative", "latents-nan"])
def test_arguments_that_would_fail_obscurely_or_be_silently_wrong_are_refused(pipe, kwargs, error, message):
    """Before: a TypeError from torch's repeat_interleave, an AttributeError on int.device, a timestep the model never
    saw (or an ascending schedule) sampled without a word, guidance_rescale=-1 read as 0, NaN latents or eta=5 blamed
    on the sampler ("try fewer steps")."""
    if "latents" in kwargs:  # the tiny run's latent shape
        kwargs = {"latents": torch.full((1, pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                                         pipe.unet.config.sample_size), float("nan"))}
        message = message.replace("256", str(kwargs["latents"].numel()))
    steps = {} if "timesteps" in kwargs or "num_inference_steps" in kwargs else {"num_inference_steps": 2}
    with pytest.raises(error, match=f"^{message}"):
        pipe("Draw a six", guidance_scale=2.0, **steps, **kwargs)


class CudaGenerator:  # stands in for torch.Generator("cuda") on a machine without a GPU
    device = torch.device("cuda")


def test_a_generator_on_another_device_is_refused_with_the_fix(pipe):
    with pytest.raises(ValueError, match=r"generator is on cuda but the pipeline runs on cpu; pass torch.Generator\('cpu'\)"):
        pipe("Draw a six", num_inference_steps=1, generator=CudaGenerator())


def test_generate_command_writes_pngs_and_a_grid(tiny_run, tmp_path):
    generate_cli(["--run", str(tiny_run), "Draw a six", "Draw a 7", "--num", "2", "--steps", "2", "--out", str(tmp_path)])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["00-draw-a-six-0.png", "00-draw-a-six-1.png", "01-draw-a-7-0.png", "01-draw-a-7-1.png", "grid.png"]
    assert PIL.Image.open(tmp_path / "00-draw-a-six-0.png").size == (16, 16)


def test_generate_all_classes_prompts_each_class_of_the_run(tiny_run, tmp_path):
    generate_cli(["--run", str(tiny_run), "--all-classes", "--num", "1", "--steps", "1", "--out", str(tmp_path)])
    classes = json.loads((tiny_run / "model_index.json").read_text(encoding="utf-8"))["classes"]
    written = sorted(p.name for p in tmp_path.glob("[0-9]*.png"))
    assert written == sorted(f"{k:02d}-{slug(c['prompt'])}-0.png" for k, c in enumerate(classes))
    assert len(written) == len(classes) >= 2


def test_evaluate_writes_every_measure_consistently(tiny_run, tmp_path):
    from pipelines.evaluate import main as evaluate_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = tiny_config(run, "evaluate.paraphrases=[\"{symbol}\"]", "sample.num_inference_steps=2")
    results = evaluate_main(config)
    assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(results))
    recognition = results["recognition"]
    names = "zero one two three four five six seven eight nine".split()
    assert list(recognition["per_class"]) == names
    # the source's prompt for each class, its article agreeing with the name
    assert recognition["prompts"] == [f"Draw {'an' if n == 'eight' else 'a'} {n}" for n in names]
    assert recognition["images_per_class"] == 2
    per_class = list(recognition["per_class"].values())
    assert all(v in (0.0, 0.5, 1.0) for v in per_class)  # 2 images per class
    assert recognition["accuracy"] == pytest.approx(sum(per_class) / 10)
    assert recognition["min_class"] == min(per_class)
    # the ceiling's split (held-out digits: the classifier learns the training split) through the VAE
    from common.data import load_train_and_holdout
    from pipelines.generate import load_pipeline
    from pipelines.quality import real_images, recognition_rate, shape_groups, train_classifier
    from vae.reconstruct import reconstruct
    train_set, holdout_set = load_train_and_holdout(config.data)
    classifier, ceiling = train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    vae = load_pipeline(run, "cpu").vae
    decoded = torch.cat([reconstruct(vae, chunk) for chunk in real_images(holdout_set).split(256)])
    assert recognition["classifier_heldout_accuracy"] == ceiling
    assert recognition["vae_reconstruction_accuracy"] == recognition_rate(
        classifier, decoded, torch.tensor(holdout_set.labels), shape_groups(train_set.classes), torch.device("cpu"))
    frechet = results["frechet"]
    assert frechet["ratio"] == pytest.approx(frechet["generated_vs_heldout"] / frechet["train_vs_heldout_floor"])
    diversity = results["diversity"]
    assert diversity["relative"] == pytest.approx(diversity["generated"] / diversity["heldout"])
    assert results["memorization"]["rate"] * 20 == pytest.approx(round(results["memorization"]["rate"] * 20))
    assert list(results["paraphrase"]["per_template"]) == ["{symbol}"] and results["paraphrase"]["images_per_prompt"] == 2
    assert results["num_inference_steps"] == 2 and results["sampler"] == "DPMSolverMultistepScheduler"
    assert (run / "evaluator" / "classifier.safetensors").is_file()  # cached for the next evaluation
    again = evaluate_main(config)  # the cached classifier and the seeds give the same numbers
    assert again["recognition"] == recognition and again["frechet"] == frechet


def test_model_index_written_by_train_ldm_is_what_save_pretrained_writes(tiny_run, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    written = json.loads((tiny_run / "model_index.json").read_text(encoding="utf-8"))
    saved = json.loads((tmp_path / "copy" / "model_index.json").read_text(encoding="utf-8"))
    assert saved.pop("_name_or_path") == str(tiny_run)  # where a loaded pipeline came from
    # built_from hashes the files of each folder: the copy's are its own (transformers adds settings to tokenizer_config.json)
    from common.checkpoint import folder_fingerprint

    recorded = ("vae", "text_encoder", "tokenizer", "unet")
    assert saved.pop("built_from") == {name: folder_fingerprint(tmp_path / "copy" / name) for name in recorded}
    assert written.pop("built_from") == {name: folder_fingerprint(tiny_run / name) for name in recorded}
    assert written == saved
    assert [c["prompt"] for c in written["classes"]] == [f"Draw {'an' if n == 'eight' else 'a'} {n}" for n in
                                                         "zero one two three four five six seven eight nine".split()]


def test_a_run_with_the_old_classes_json_still_loads(tiny_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    index = json.loads((run / "model_index.json").read_text(encoding="utf-8"))
    (run / "classes.json").write_text(json.dumps(index.pop("classes")), encoding="utf-8")
    (run / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    old = LatentPipeline.from_pretrained(run)
    assert old.classes == json.loads((run / "classes.json").read_text(encoding="utf-8"))
    assert old.segment("26") == [2, 6]


def test_training_previews_and_the_pipeline_sample_the_same_way(tiny_run, pipe):
    """train-ldm's sample grids come from ldm.sampling, the path the pipeline wraps: same seed, same images."""
    from ldm.sampling import sample_images

    prompts = ["Draw a six", "Draw a 7"]
    preview = sample_images(pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.scheduler, prompts, 2, 3, 2.0,
                            torch.Generator().manual_seed(5))
    images = pipe(prompts, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(5)).images
    assert [np.asarray(a).tobytes() for a in preview] == [np.asarray(b).tobytes() for b in images]


def test_the_run_samples_with_its_own_defaults_unless_told(tiny_run, pipe, tmp_path):
    """train-ldm saves the config's sampling settings in model_index.json; pipe(prompt) and write() use
    them, an explicit argument wins, and a run saved before them falls back to 20 steps, guidance 4."""
    assert pipe.config.sampling == {"num_inference_steps": 2, "guidance_scale": 2.0,  # configs/tiny.yaml's sample
                                    "guidance_interval": [0.0, 1.0]}
    default = run_pipe(pipe, output_type="np", num_inference_steps=None, guidance_scale=None)
    assert np.array_equal(default, run_pipe(pipe, output_type="np", num_inference_steps=2, guidance_scale=2.0))
    assert not np.array_equal(default, run_pipe(pipe, output_type="np", num_inference_steps=2, guidance_scale=5.0))
    line = pipe.write("26", generator=torch.Generator().manual_seed(1))
    assert np.array_equal(np.asarray(line), np.asarray(
        pipe.write("26", num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))))
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    index = json.loads((old / "model_index.json").read_text())
    del index["sampling"]
    (old / "model_index.json").write_text(json.dumps(index))
    assert LatentPipeline.from_pretrained(old).config.sampling == {"num_inference_steps": 20, "guidance_scale": 4.0}


@pytest.mark.parametrize("edit, problem", [
    ({"guidance_scale": "2.5"}, "guidance_scale must be a finite number (e.g. 1.75), got '2.5'"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number >= 1 (e.g. 20), got 0"),
    ({"guidance_interval": [1, 0]}, "guidance_interval must be (start, stop) with 0 <= start < stop <= 1, the fraction "
                                    "of the steps that are guided (e.g. (0.2, 1.0)), got (1, 0)"),
    ({"steps": 5}, "'steps' is not a key of it (its keys: num_inference_steps, guidance_scale, guidance_interval)"),
], ids=["guidance-text", "steps-zero", "interval-reversed", "misspelt-key"])
def test_a_runs_bad_sampling_defaults_are_refused_at_load_naming_model_index(tiny_run, tmp_path, edit, problem):
    """Before: a value edited into model_index.json "sampling" loaded, then every call was refused as if the caller had
    passed it ("guidance_scale must be a finite number ..., got '2.5'"); a misspelt key was ignored without a word."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    index = json.loads((run / "model_index.json").read_text(encoding="utf-8"))
    index["sampling"].update(edit)
    (run / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"the run's sampling defaults (model_index.json \"sampling\") are wrong: {problem}; correct them there "
            f"(evaluate with evaluate.tune: true measures and writes them)") + "$"):
        LatentPipeline.from_pretrained(run)


@pytest.mark.parametrize("classes, wrong", [
    ("0123456789", "it is '0123456789'"),
    ([{"key": "0", "prompt": "Draw a zero"}], "entry 0 is {'key': '0', 'prompt': 'Draw a zero'}"),
], ids=["text", "no-fields"])
def test_a_runs_bad_class_table_is_refused_at_load_naming_model_index(tiny_run, tmp_path, classes, wrong):
    """Before: it loaded, then write("26") stopped with "TypeError: string indices must be integers, not 'str'" or
    "KeyError: 'fields'"."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    index = json.loads((run / "model_index.json").read_text(encoding="utf-8"))
    index["classes"] = classes
    (run / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"the run's class table (model_index.json \"classes\") is wrong: {wrong}, where it needs a list of "
            f"{{\"key\", \"fields\", \"prompt\"}} entries as train-ldm writes them; re-run train-ldm, or restore "
            f"model_index.json") + "$"):
        LatentPipeline.from_pretrained(run)


def test_evaluate_tunes_the_runs_sampling_defaults_by_its_rule(tiny_run, tmp_path):
    from pipelines.evaluate import main as evaluate_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = tiny_config(run, "evaluate.tune=true", "evaluate.tune_guidance=[1.0, 2.0, 3.0]", "evaluate.tune_steps=[1, 2]",
                         "evaluate.tune_images_per_class=2", "evaluate.tune_min_recognition=0.0")
    results = evaluate_main(config)
    tuning = json.loads((run / "sampling_tuning.json").read_text())
    assert [(r["num_inference_steps"], r["guidance_scale"]) for r in tuning["table"]] == \
        [(1, 1.0), (1, 2.0), (1, 3.0), (2, 1.0), (2, 2.0), (2, 3.0)]
    best = max(tuning["table"], key=lambda r: (r["diversity"], -r["num_inference_steps"]))  # every row reaches 0%
    assert tuning["chosen"] == {"num_inference_steps": best["num_inference_steps"], "guidance_scale": best["guidance_scale"],
                                "guidance_interval": [0.0, 1.0]}
    assert json.loads((run / "model_index.json").read_text())["sampling"] == tuning["chosen"]
    assert LatentPipeline.from_pretrained(run).config.sampling == tuning["chosen"]
    assert [results[key] for key in ("num_inference_steps", "guidance_scale", "guidance_interval")] == \
        list(tuning["chosen"].values())


def test_prompt_embeds_are_the_prompt_encode_prompt_as_stable_diffusion(pipe):
    prompt_embeds, negative = pipe.encode_prompt("Draw a six", "cpu", 2, True, negative_prompt="Draw a one")
    assert prompt_embeds.shape == negative.shape == (2, 16, 32)  # repeated per image, as StableDiffusionPipeline does
    one, one_negative = pipe.encode_prompt(["Draw a six"], "cpu", 1, True, "Draw a one")
    by_text = run_pipe(pipe, "Draw a six", negative_prompt="Draw a one", output_type="np")
    by_embeds = run_pipe(pipe, None, prompt_embeds=one, negative_prompt_embeds=one_negative, output_type="np")
    assert np.array_equal(by_text, by_embeds)
    assert np.array_equal(run_pipe(pipe, "Draw a six", output_type="np"), run_pipe(pipe, None, prompt_embeds=one, output_type="np"))
    with pytest.raises(ValueError, match="pass either prompt or prompt_embeds, not both"):
        pipe("Draw a six", prompt_embeds=one)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(batch, tokens, 32\), got \(1, 16\)"):
        pipe(None, prompt_embeds=one[:, :, 0])


def test_callback_tensors_are_used_from_then_on(pipe):
    seven, _ = pipe.encode_prompt("Draw a seven", "cpu", 1, False)
    plain = run_pipe(pipe, "Draw a six", output_type="np", num_inference_steps=3)
    same = run_pipe(pipe, "Draw a six", output_type="np", num_inference_steps=3,
                    callback_on_step_end=lambda p, i, t, tensors: tensors, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert np.array_equal(plain, same)
    switched = run_pipe(pipe, "Draw a six", output_type="np", num_inference_steps=3,
                        callback_on_step_end=lambda p, i, t, tensors: {"prompt_embeds": seven},
                        callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert not np.array_equal(plain, switched)  # steps 2 and 3 denoised towards "Draw a seven"


def test_eta_guidance_rescale_custom_timesteps_and_latent_output(pipe):
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        deterministic = run_pipe(pipe, output_type="np", num_inference_steps=4)
        assert np.array_equal(deterministic, run_pipe(pipe, output_type="np", num_inference_steps=4, eta=0.0))
        assert not np.array_equal(deterministic, run_pipe(pipe, output_type="np", num_inference_steps=4, eta=1.0))
    finally:
        pipe.scheduler = original
    plain = run_pipe(pipe, output_type="np")
    assert np.array_equal(plain, run_pipe(pipe, output_type="np", guidance_rescale=0.0))
    assert not np.array_equal(plain, run_pipe(pipe, output_type="np", guidance_rescale=0.7))
    run_pipe(pipe, output_type="np", timesteps=[999, 600, 300, 1])
    assert pipe.scheduler.timesteps.tolist() == [999, 600, 300, 1]
    latents = run_pipe(pipe, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)


def test_guidance_interval_guides_only_its_steps_and_defaults_to_the_runs_own(pipe):
    from ldm.sampling import guided_steps

    assert guided_steps(20, (0.2, 1.0)) == range(4, 20) and guided_steps(3, (0.0, 1.0)) == range(0, 3)
    batches = []  # the UNet's batch at each step: 2 (uncond + cond) where guided, 1 where conditional only
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
    saved = dict(pipe.config.sampling)
    try:
        every_step = run_pipe(pipe, output_type="np", num_inference_steps=4)
        assert batches == [2, 2, 2, 2]
        batches.clear()
        assert np.array_equal(every_step, run_pipe(pipe, output_type="np", num_inference_steps=4,
                                                   guidance_interval=(0.0, 1.0)))
        batches.clear()
        late = run_pipe(pipe, output_type="np", num_inference_steps=4, guidance_interval=(0.5, 1.0))
        assert batches == [1, 1, 2, 2] and not np.array_equal(late, every_step)
        batches.clear()
        pipe.register_to_config(sampling={**saved, "guidance_interval": [0.5, 1.0]})  # the run's own default
        assert np.array_equal(late, run_pipe(pipe, output_type="np", num_inference_steps=4))
        assert batches == [1, 1, 2, 2]
        batches.clear()
        assert np.array_equal(every_step, run_pipe(pipe, output_type="np", num_inference_steps=4,
                                                   guidance_interval=(0.0, 1.0)))  # the caller's wins
    finally:
        hook.remove()
        pipe.register_to_config(sampling=saved)
    with pytest.raises(ValueError, match=r"guidance_interval must be \(start, stop\) with 0 <= start < stop <= 1, the "
                                         r"fraction of the steps that are guided \(e.g. \(0.2, 1.0\)\), got \(0.6, 0.2\)"):
        run_pipe(pipe, guidance_interval=(0.6, 0.2))
    with pytest.raises(ValueError, match=r"guidance_interval must be \(start, stop\) .* got 0.5"):
        run_pipe(pipe, guidance_interval=0.5)


def test_diffusion_pipeline_from_pretrained_with_the_custom_pipeline_keeps_the_class_table(tiny_run):
    from diffusers import DiffusionPipeline

    import pipelines.latent_pipeline

    loaded = DiffusionPipeline.from_pretrained(tiny_run, custom_pipeline=pipelines.latent_pipeline.__file__,
                                               trust_remote_code=True)
    assert type(loaded).__name__ == "LatentPipeline"
    assert [c["prompt"] for c in loaded.classes][:2] == ["Draw a zero", "Draw a one"]
    assert loaded.config.sampling == {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_interval": [0.0, 1.0]}


def test_tuning_rule_takes_the_most_diverse_legible_setting_then_falls_back_as_it_says():
    from pipelines.tuning import choose_setting

    def row(guidance, recognition, min_class, diversity, steps=20):
        return {"num_inference_steps": steps, "guidance_scale": guidance, "recognition": recognition,
                "min_class": min_class, "diversity": diversity, "fd_ratio": 1.5}
    table = [row(1.25, 0.94, 0.8, 0.95), row(1.5, 0.98, 0.85, 0.9), row(1.75, 1.0, 1.0, 0.85), row(2.0, 1.0, 1.0, 0.8),
             row(1.75, 1.0, 1.0, 0.85, steps=10)]
    assert choose_setting(table, 0.97) == (table[1], "most diverse among settings with recognition >= 97%")
    assert choose_setting(table, 0.97, 0.9) == (  # a tie in diversity: the fewer steps
        table[4], "most diverse among settings with recognition >= 97% and every class >= 90%")
    eighteen_of_twenty = torch.tensor([1.0] * 18 + [0.0] * 2).mean().item()  # 0.8999999761581421, as evaluate measures it
    assert choose_setting([row(1.5, 0.97, eighteen_of_twenty, 0.9), row(2.0, 1.0, 1.0, 0.8)], 0.97, 0.9)[0]["guidance_scale"] == 1.5
    weak = [row(1.5, 0.98, 0.85, 0.9), row(2.0, 0.99, 0.8, 0.8)]
    assert choose_setting(weak, 0.97, 0.9) == (
        weak[0], "most diverse among settings with recognition >= 97% (none had every class >= 90%)")
    assert choose_setting(weak, 0.995, 0.9) == (
        weak[1], "most diverse among settings with recognition >= 99.5% and every class >= 90% "
                 "(none reached it: the highest recognition instead)")


def test_the_evaluator_classifier_does_not_depend_on_what_ran_before_in_the_process(tmp_path):
    """One process may run every stage (scripts/quickstart.py): evaluate's classifier is seeded before its init."""
    from common.data import load_train_and_holdout
    from pipelines.quality import train_classifier

    weights = []
    for i, draws in enumerate((0, 1000)):  # and not on the run's seed: one yardstick for runs of every seed
        config = tiny_config(tmp_path / f"run{i}", "evaluate.classifier_steps=2", f"seed={i}")
        train_set, holdout_set = load_train_and_holdout(config.data)
        torch.rand(draws)  # another stage's use of the global generator
        weights.append(train_classifier(config, train_set, holdout_set, torch.device("cpu"))[0].state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("damage", ["cut short", "nan weight"])
def test_a_damaged_cached_evaluator_classifier_is_trained_again(tmp_path, capsys, damage):
    """run/evaluator/ is a cache: a file cut short (before: a traceback with safetensors' bare 'incomplete metadata')
    or holding a NaN weight (before: loaded, every image read as one class, recognition silently wrong) is trained
    again, to the very weights the first training gave."""
    from common.checkpoint import load_tensors, save_tensors
    from common.data import load_train_and_holdout
    from pipelines.quality import CLASSIFIER_FILE, train_classifier

    config = tiny_config(tmp_path / "run", "evaluate.classifier_steps=2")
    train_set, holdout_set = load_train_and_holdout(config.data)
    first, ceiling = train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    cached = tmp_path / "run" / "evaluator" / CLASSIFIER_FILE
    whole = cached.read_bytes()
    if damage == "cut short":
        cached.write_bytes(whole[:len(whole) // 2])
    else:
        tensors, meta = load_tensors(cached)
        next(t for t in tensors.values() if t.is_floating_point()).view(-1)[0] = float("nan")
        save_tensors(cached, tensors, meta)
    capsys.readouterr()
    again, ceiling_again = train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert ceiling_again == ceiling and cached.read_bytes() == whole
    assert all(torch.equal(first.state_dict()[k], again.state_dict()[k]) for k in first.state_dict())
    said = capsys.readouterr().out
    assert ("ignoring the unreadable cached classifier" in said) == (damage == "cut short")


def test_a_path_that_is_not_a_whole_run_folder_is_refused_naming_what_is_missing(tiny_run, tmp_path):
    """Before: a file gave AttributeError ('PosixPath' object has no attribute 'count'); a folder without unet/ or
    scheduler/ gave diffusers' "no file named config.json found in directory RUN", naming the run, not the component."""
    with pytest.raises(RunFolderError, match=f"^'{tiny_run / 'model_index.json'}' is a file, not a run folder; pass the "
                                             f"folder that holds model_index.json \\(train-ldm writes it\\), e.g. '{tiny_run}'$"):
        LatentPipeline.from_pretrained(tiny_run / "model_index.json")
    stage_one = tmp_path / "stage-one"
    shutil.copytree(tiny_run / "vae", stage_one / "vae")
    with pytest.raises(RunFolderError, match=f"^'{stage_one}' has no model_index.json, so it is not a finished run folder "
                                             f"\\(it holds the vae stage\\(s\\) so far\\); train-ldm writes it: run "
                                             f"`train-ldm --config ...` into it, or pass another run folder$"):
        LatentPipeline.from_pretrained(stage_one)
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "unet" / "config.json").unlink()
    with pytest.raises(RunFolderError, match=f"^unet/config.json is missing in {run}; re-run `train-ldm --config ...` into "
                                             f"this run folder to write it, or restore unet/ from a copy of the run$"):
        LatentPipeline.from_pretrained(run)
    shutil.rmtree(run / "scheduler")
    with pytest.raises(RunFolderError, match=f"^scheduler/ is missing in {run}"):
        LatentPipeline.from_pretrained(run)
    shutil.copytree(tiny_run / "scheduler", run / "scheduler")
    shutil.copy(tiny_run / "unet" / "config.json", run / "unet" / "config.json")
    shutil.rmtree(run / "vae")
    with pytest.raises(RunFolderError, match=f"^vae/ is missing in {run}; re-run `train-vae --config ...`"):
        LatentPipeline.from_pretrained(run)


def test_a_unet_missing_some_weights_is_refused_not_filled_with_random_ones(tmp_path):
    """Before: a unet/ whose safetensors lacked a weight (here conv_out.weight; a pipeline saved with LoRA adapters
    loaded lacks 40) loaded with a warning only ("newly initialized"): left on the meta device, or random with
    low_cpu_mem_usage=False, and then sampled noise. checkpoints/mnist's model_index.json has no unet hash to catch it."""
    from safetensors.torch import load_file, save_file

    run = shutil.copytree(ROOT / "checkpoints" / "mnist", tmp_path / "run")
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["conv_out.weight"]
    save_file(tensors, weights)
    for kwargs in ({}, {"low_cpu_mem_usage": False}):
        with pytest.raises(RunFolderError, match=f"^unet/ in {run} lacks 1 of its model's weights \\(conv_out.weight\\), "
                                                 f"which would be random: it was saved incomplete \\(e.g. with LoRA "
                                                 f"adapters loaded\\). Re-run `train-ldm --config ...` into this run "
                                                 f"folder, or restore unet/ from a copy of the run$"):
            LatentPipeline.from_pretrained(run, **kwargs)
