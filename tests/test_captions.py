"""Each source owns its classes and caption templates; everything asks it through one prompt builder."""

import pytest
from PIL import Image

from common.config import DataConfig
from common.data import ImageDataset, class_prompt, list_dataset
from common.data.captions import build_captions
from common.data.devanagari import CAPTIONS as DEVANAGARI_CAPTIONS
from common.data.folders import CAPTIONS as FOLDER_CAPTIONS
from common.data.mnist import CAPTIONS as MNIST_CAPTIONS
from common.errors import DatasetError


def dhcd_folder(root):
    for split, count in [("Train", 3), ("Test", 1)]:
        for name in ["character_1_ka", "digit_3"]:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (32, 32), 255 * (i % 2)).save(root / split / name / f"{i}.png")
    return root


def test_each_source_brings_its_own_templates(tmp_path, class_folder):
    assert list_dataset(DataConfig(name="mnist")).templates == MNIST_CAPTIONS
    assert list_dataset(DataConfig(name="", path=str(class_folder))).templates == FOLDER_CAPTIONS
    # the Devanagari dataset's folders get the Devanagari templates, like the built-in source
    assert list_dataset(DataConfig(name="", path=str(dhcd_folder(tmp_path / "dhcd")))).templates == DEVANAGARI_CAPTIONS


def test_training_captions_and_class_prompts_agree_for_every_source(tmp_path, class_folder):
    for config in [DataConfig(name="mnist"), DataConfig(name="", path=str(class_folder)),
                   DataConfig(name="", path=str(dhcd_folder(tmp_path / "dhcd"))),
                   DataConfig(name="mnist", captions=["{symbol} please", "Draw a {name}"])]:
        dataset = ImageDataset(config, "all")
        prompts = dataset.class_prompts()
        assert len(prompts) == len(dataset.classes)
        for label, prompt in enumerate(prompts):
            first = dataset.labels.index(label)
            assert dataset.captions[dataset.caption_ids[first][0]] == prompt  # the first caption it trains on


def test_class_prompt_takes_the_first_template_that_fits():
    ka = {"name": "ka", "symbol": "क", "kind": "letter", "letter": "ka"}
    three = {"name": "three", "symbol": "३", "kind": "digit", "digit": "three"}
    assert class_prompt(ka, DEVANAGARI_CAPTIONS) == "Draw the letter ka"
    assert class_prompt(three, DEVANAGARI_CAPTIONS) == "Draw the Devanagari digit three"
    assert class_prompt({"name": "x"}, ["{symbol}"]) is None


def test_a_class_no_template_fits_is_a_clear_error():
    listing = list_dataset(DataConfig(name="mnist", max_per_class=2))
    with pytest.raises(DatasetError, match=r"no caption template fits class '0' \(fields: \['name', 'symbol'\]\)"):
        build_captions(listing, ["the letter {letter}"])


def test_unknown_built_in_dataset_names_the_known_ones():
    with pytest.raises(DatasetError, match="unknown built-in dataset data.name='emnist'; use one of 'mnist', 'devanagari'"):
        list_dataset(DataConfig(name="emnist"))


def test_the_article_before_a_field_agrees_with_its_value():
    from common.data.captions import format_caption
    from common.data.mnist import CAPTIONS as MNIST_CAPTIONS, DIGIT_NAMES

    prompts = [class_prompt({"name": name, "symbol": str(d)}, MNIST_CAPTIONS) for d, name in enumerate(DIGIT_NAMES)]
    assert prompts[8] == "Draw an eight" and prompts[6] == "Draw a six" and prompts[1] == "Draw a one"
    assert [format_caption("A {name}, handwritten", {"name": n}) for n in ("8", "apple", "unicorn", "umbrella", "hour")] == \
        ["An 8, handwritten", "An apple, handwritten", "A unicorn, handwritten", "An umbrella, handwritten", "An hour, handwritten"]
    assert format_caption("Draw an {name}", {"name": "six"}) == "Draw a six"  # the template's own article is corrected too
    assert format_caption("a {case} letter {letter}", {"case": "capital", "letter": "A"}) == "a capital letter A"
    assert format_caption("data {name}", {"name": "eight"}) == "data eight"  # only a whole-word article
