import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from common.data import ImageDataset
from common.errors import RunFolderError, UserError
from conftest import ROOT, shape_image, tiny_config
from ldm.encode import main as encode_main
from ldm.latents import StaleCacheError, load_cache, vae_fingerprint
from ldm.text import check_prompts_apart, encode_text, prompt_separation, tokenize, train_tokenizer
from ldm.train import main as ldm_main
from ldm.train_clip import contrastive_loss


def test_tokenizer_covers_unseen_words_and_scripts(tmp_path):
    tokenizer = train_tokenizer(["Draw a six", "the digit six", "Draw the letter ka", "क्ष"] * 20, 400, 16)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    for text in ["Sketch the number 4", "ज्ञ and 🎉", "a four, handwritten"]:
        ids = loaded(text).input_ids
        assert ids[0] == 0 and ids[-1] == 1  # start and end tokens
        assert loaded.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    assert len(loaded("Draw a six").input_ids) < len(loaded("Dxrzw q sjx").input_ids)  # merges learned from captions
    padded = loaded(["six"], padding="max_length", max_length=loaded.model_max_length).input_ids[0]
    assert len(padded) == 16


def test_tokenizer_is_the_same_in_every_process():
    """Equally frequent pairs abound in caption corpora; their merge order must not depend on hashing."""
    script = ("import json, sys; from ldm.text import train_tokenizer; "
              "names = 'zero one two three four five six seven eight nine'.split(); "
              "t = train_tokenizer([f'{a} {n}' for a in ['Draw a', 'the digit', 'a handwritten'] for n in names], 1000, 16); "
              "print(t.backend_tokenizer.to_str())")
    outputs = {subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outputs) == 1 and '"merges"' in outputs.pop()


def test_train_clip_writes_a_pretrained_style_text_encoder(tiny_run):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_run / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_run / "text_encoder")
    states = encode_text(tokenizer, encoder, ["Draw a six", "Draw a seven", ""])
    assert states.shape == (3, 16, 32)
    assert not torch.allclose(states[0], states[1])
    metrics = json.loads((tiny_run / "clip_metrics.json").read_text())
    assert metrics["heldout_images"] == 40 and metrics["step"] == 4  # 20% of 10 x 20 digits; clip.max_steps
    correct = metrics["zero_shot_accuracy"] * 40
    assert correct == pytest.approx(round(correct))  # a share of the 40 held-out images
    closest = metrics["closest_to_empty_prompt"]  # the class prompt train-ldm would refuse first
    prompts = ImageDataset(tiny_config(tiny_run).data, "all").class_prompts()
    separation = prompt_separation(tokenizer, encoder, prompts)
    assert closest == {"prompt": min(separation, key=separation.get), "separation": pytest.approx(min(separation.values()))}


def test_train_clip_on_one_class_says_why_zero_shot_accuracy_is_not_measured(tmp_path, capsys):
    from ldm.train_clip import main as clip_main

    root = tmp_path / "one"
    (root / "circle").mkdir(parents=True)
    for i in range(5):
        shape_image("circle", (16, 16), seed=i).save(root / "circle" / f"{i}.png")
    run = tmp_path / "run"
    clip_main(tiny_config(run, "data.name=", f"data.path={root}", "clip.max_steps=1"))
    assert ("[clip] zero-shot accuracy on 1 held-out images: not measured (its 1 image(s) are all of one class "
            "('circle'), so there is nothing to choose between)") in capsys.readouterr().out
    assert json.loads((run / "clip_metrics.json").read_text())["zero_shot_accuracy"] is None


def test_contrastive_loss_takes_extra_texts_as_negatives_only():
    # two images, their two texts, and the empty prompt's column, which matches neither image
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 3.0, 2.5]])
    positives = torch.tensor([[True, False, False], [False, True, False]])
    expected = 0.5 * (F.cross_entropy(logits, torch.tensor([0, 1])) + F.cross_entropy(logits.T[:2], torch.tensor([0, 1])))
    assert contrastive_loss(logits, positives).item() == pytest.approx(expected.item(), abs=1e-6)
    # the empty prompt's column raises the image-side loss: it is a negative every image is pushed from
    assert contrastive_loss(logits, positives) > contrastive_loss(logits[:, :2], positives[:, :2])


@pytest.mark.parametrize("negative", [True, False])
def test_the_empty_prompt_joins_every_clip_batch_unless_turned_off(tmp_path, monkeypatch, negative):
    from transformers import CLIPModel

    from ldm.train_clip import main as clip_main

    batches, forward = [], CLIPModel.forward
    monkeypatch.setattr(CLIPModel, "forward", lambda self, input_ids=None, pixel_values=None, **kw: batches.append(
        (input_ids.clone(), len(pixel_values))) or forward(self, input_ids=input_ids, pixel_values=pixel_values, **kw))
    clip_main(tiny_config(tmp_path / "run", "clip.max_steps=2", f"clip.empty_prompt_negative={str(negative).lower()}"))
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    empty = tokenize(tokenizer, [""]).input_ids[0]  # as train-clip tokenizes it
    training = [(ids, images) for ids, images in batches if images == 16]  # clip.batch_size; zero-shot batches differ
    assert len(training) == 2
    for ids, images in training:
        assert len(ids) == images + negative and torch.equal(ids[-1].cpu(), empty) == negative


def test_a_class_prompt_read_like_the_empty_prompt_is_refused(tiny_run):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_run / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_run / "text_encoder")
    check_prompts_apart(tokenizer, encoder, ["Draw a six", "Draw a seven"], "(run)")  # apart: no error
    assert prompt_separation(tokenizer, encoder, ["Draw a six", "Draw a seven", ""])[""] == 0.0
    with pytest.raises(UserError) as caught:
        check_prompts_apart(tokenizer, encoder, ["Draw a six", "Draw a seven", ""], "(run)")
    assert str(caught.value) == (
        "the text encoder (run) reads '' (0.000) almost like the empty prompt (distance to it, as a fraction of the "
        "typical distance between two class prompts, under 0.1), so classifier-free guidance could not draw that "
        "class. Retrain it with train-clip (which keeps every caption apart from the empty prompt), or set "
        "text_encoder.pretrained to another CLIP")


def test_train_ldm_refuses_a_text_encoder_that_reads_every_class_alike(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    encoder = CLIPTextModel.from_pretrained(run / "text_encoder")
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()  # every prompt's states become the same
    encoder.save_pretrained(run / "text_encoder")
    before = {path: path.read_bytes() for path in [run / "config.yaml", *sorted((run / "unet").iterdir())]}
    with pytest.raises(UserError, match=r"^the text encoder \(.*text_encoder\) reads every class prompt alike, so the "
                                        r"UNet could not tell the classes apart\. Retrain it with train-clip"):
        ldm_main(tiny_config(run, "ldm.max_steps=8"))
    assert {path: path.read_bytes() for path in before} == before  # nothing written


def test_latent_cache_holds_every_image_with_mean_and_std(tiny_run):
    config = tiny_config(tiny_run)
    dataset = ImageDataset(config.data, "all")
    cache = load_cache(tiny_run / "latents", vae_fingerprint(tiny_run / "vae"), dataset.fingerprint())
    assert len(cache) == len(dataset) == 200
    mean, std = cache.latents(torch.arange(200))
    assert mean.shape == std.shape == (200, 4, 8, 8)
    assert (std > 0).all()
    assert int(cache.holdout.sum()) == sum(dataset.holdout) == 40
    assert cache.labels.tolist() == dataset.labels
    six = dataset.labels.index(6)
    assert cache.captions[int(cache.captions_per_image[six, 0])] == dataset.captions[dataset.caption_ids[six][0]]
    # the cache equals a fresh encoding of the same image with the saved VAE
    vae = AutoencoderKL.from_pretrained(tiny_run / "vae")
    posterior = vae.encode(dataset[six]["pixel_values"][None]).latent_dist
    assert torch.allclose(mean[six], posterior.mean[0], atol=1e-5)
    # reading a few rows gives the same as reading them all
    some_mean, some_std = cache.latents(torch.tensor([six, 3, 150]))
    assert torch.equal(some_mean, mean[[six, 3, 150]]) and torch.equal(some_std, std[[six, 3, 150]])


def test_encode_again_does_nothing_and_stale_caches_are_refused(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = (run / "latents" / "manifest.json").stat().st_mtime_ns
    encode_main(tiny_config(run))
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "latents" / "manifest.json").stat().st_mtime_ns == manifest

    # a dataset change (fewer images per class) makes the cache stale for train-ldm; asked for with --set, it is
    # refused first (one dataset per run folder); in a folder without config.yaml, by the cache's fingerprint
    with pytest.raises(RunFolderError, match=r"\(data.max_per_class: 20 -> 10; from "):
        ldm_main(tiny_config(run, "data.max_per_class=10"))
    (run / "config.yaml").unlink()
    with pytest.raises(StaleCacheError, match="re-run `encode-dataset"):
        ldm_main(tiny_config(run, "data.max_per_class=10"))

    # so does a retrained VAE
    vae = AutoencoderKL.from_pretrained(run / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(run / "vae")
    with pytest.raises(StaleCacheError, match="different VAE"):
        ldm_main(tiny_config(run))
    encode_main(tiny_config(run))  # re-encoding makes it current again
    cache = load_cache(run / "latents", vae_fingerprint(run / "vae"), ImageDataset(tiny_config(run).data, "all").fingerprint())
    assert len(cache) == 200


def test_training_timesteps_uniform_or_logit_normal():
    from common.config import LDMConfig
    from ldm.model import training_timesteps

    uniform, logit_normal = LDMConfig(), LDMConfig(timestep_sampling="logit_normal")
    torch.manual_seed(0)
    drawn = training_timesteps(6, uniform, torch.device("cpu"))
    torch.manual_seed(0)
    assert drawn.tolist() == torch.randint(0, 1000, (6,)).tolist()  # the default draws as before
    torch.manual_seed(0)
    drawn = training_timesteps(4096, logit_normal, torch.device("cpu"))
    torch.manual_seed(0)
    assert drawn.tolist() == (torch.sigmoid(torch.randn(4096)) * 1000).long().tolist()
    assert drawn.min() >= 0 and drawn.max() <= 999
    # SD3's logit-normal(0, 1): a third of the draws in the middle fifth of the schedule (uniform: a fifth)
    assert 0.3 < ((drawn >= 400) & (drawn < 600)).float().mean() < 0.36
