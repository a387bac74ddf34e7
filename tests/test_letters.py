"""The `letters` dataset (A-Z, a-z, 0-9 from six handwriting fonts, one held out), the layout of a written
line, and a letters run through the whole chain."""

import dataclasses
import re
import string

import numpy as np
import PIL.Image
import pytest
import torch

import common.data.letters as letters
from common.config import ConfigError, DataConfig
from common.config_yaml import load_config
from common.data import ImageDataset, list_dataset
from common.data.captions import class_prompt
from common.data.glyph_render import hands_per_class, why_not_drawn
from common.data.listing import ImageClass
from common.errors import DatasetError
from conftest import ROOT, tiny_config
from pipelines.glyphs import LineLayout, lay_out_line, segment, vertical_role
from pipelines.quality import shape_groups

FONTS = ["caveat", "kalam", "shadows-into-light", "dancing-script", "permanent-marker", "indie-flower"]


@pytest.fixture(scope="module", autouse=True)
def render_cache(tmp_path_factory):
    """Renders go to a cache folder of this module's own, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


def letters_config(**changes) -> DataConfig:
    return DataConfig(**{"name": "letters", "per_class": 6, **changes})


# ---- the dataset ---------------------------------------------------------------------------------


def test_62_classes_whose_prompts_tell_case_apart():
    dataset = ImageDataset(letters_config(), "all")
    keys = [c.key for c in dataset.classes]
    assert keys == ([f"capital_{c}" for c in string.ascii_uppercase] + [f"small_{c}" for c in string.ascii_lowercase]
                    + [f"digit_{d}" for d in range(10)])
    assert len(dataset) == 62 * 6
    prompts = dataset.class_prompts()
    assert prompts[0] == "Write a capital A" and prompts[26] == "Write a small a" and prompts[59] == "Write the digit seven"
    assert len({" ".join(p.lower().split()) for p in prompts}) == 62  # distinct after CLIP's lowercasing
    for image_class in dataset.classes:  # every caption of a letter names its case
        captions = [dataset.captions[i] for i in dataset.caption_ids[dataset.labels.index(keys.index(image_class.key))]]
        if image_class.fields["kind"] == "letter":
            assert all({"capital", "small", "uppercase", "lowercase"} & set(c.lower().split()) for c in captions), captions
    assert [c.fields["symbol"] for c in dataset.classes] == list(string.ascii_uppercase + string.ascii_lowercase + string.digits)
    assert dataset.classes[0].fields["name"] == "capital A" and dataset.classes[26].fields["name"] == "small a"
    image = dataset[0]["pixel_values"]
    assert image.shape == (1, 32, 32) and image.min() == -1.0 and image.max() > 0.5  # white on black


def test_paraphrases_of_the_letters_config_are_not_training_captions():
    config = load_config(ROOT / "configs" / "letters.yaml", [])
    assert config.data.name == "letters" and config.evaluate.classifier_trained_on == "holdout"
    fields = [letters.class_fields(key) for key in letters.KEYS]
    training = {text for f in fields for t in letters.CAPTIONS if (text := _format(t, f))}
    covered = set()
    for template in config.evaluate.paraphrases:
        said = {k: text for k, f in enumerate(fields) if (text := _format(template, f))}
        assert not set(said.values()) & training
        covered |= set(said)
        assert len({v.lower() for v in said.values()}) == len(said)  # case told apart here too
    assert covered == set(range(62))


def _format(template: str, fields: dict) -> str | None:
    return class_prompt(fields, [template])


def test_the_held_out_split_is_exactly_one_font():
    listing = list_dataset(letters_config())
    assert listing.fonts[:6] == FONTS  # capital A: the six fonts take turns
    assert listing.holdout == [font == "indie-flower" for font in listing.fonts]
    held = [label for label, h in zip(listing.labels, listing.holdout) if h]
    assert sorted(set(held)) == list(range(62))  # every class has held-out images
    kalam = list_dataset(letters_config(holdout_font="kalam"))
    assert kalam.holdout == [font == "kalam" for font in kalam.fonts] and kalam.identity != listing.identity
    with pytest.raises(DatasetError, match="'comic-sans' is not a font of the letters dataset; use one of 'caveat'"):
        list_dataset(letters_config(holdout_font="comic-sans"))
    with pytest.raises(DatasetError, match="'permanent-marker' does not draw a b c .* z, so those classes"):
        list_dataset(letters_config(holdout_font="permanent-marker"))
    with pytest.raises(ConfigError, match="config key 'data.holdout_font' \\('kalam'\\) holds out one font of a rendered dataset"):
        tiny_config("run", "data.holdout_font=kalam")  # MNIST has no fonts


def test_permanent_marker_draws_capitals_and_digits_only():
    """Its lowercase letters are small capitals: framed like EMNIST they would be the capitals again."""
    drawers = hands_per_class(letters.GLYPHS)
    marker = FONTS.index("permanent-marker")
    assert [k for k, d in enumerate(drawers) if marker not in d] == list(range(26, 52))
    assert all(len(d) == 6 for k, d in enumerate(drawers) if not 26 <= k < 52)
    assert all(len(d) == 5 for d in drawers[26:52])
    assert why_not_drawn(letters.GLYPHS, 26, marker).startswith("draws 'a' as a copy of 'A'")
    listing = list_dataset(letters_config())
    assert "permanent-marker" not in listing.fonts[26 * 6:52 * 6]


def test_renders_are_deterministic_and_the_identity_follows_what_made_them(tmp_path, monkeypatch):
    a, fonts_a = letters.render_dataset(6, seed=0, processes=1)
    b, fonts_b = letters.render_dataset(6, seed=0, processes=1)  # from the cache
    assert a.shape == (62 * 6, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(fonts_a, fonts_b)
    with monkeypatch.context() as fresh:
        fresh.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cache: rendered again, the same pixels
        assert np.array_equal(letters.render_dataset(6, seed=0, processes=1)[0], a)
    assert (a.reshape(len(a), -1).max(1) > 128).all()  # every image has ink
    assert not np.array_equal(letters.render_dataset(6, seed=1, processes=1)[0], a)
    identity = list_dataset(letters_config()).identity
    assert list_dataset(letters_config(per_class=7)).identity != identity
    assert list_dataset(letters_config(seed=1)).identity != identity
    assert list_dataset(letters_config()).identity == identity


def test_the_identity_changes_with_the_renderer_and_the_fonts(monkeypatch):
    identity = list_dataset(letters_config(per_class=1)).identity
    glyphs = letters.GLYPHS
    monkeypatch.setattr(letters, "GLYPHS", dataclasses.replace(glyphs, version=glyphs.version + 1))
    assert list_dataset(letters_config(per_class=1)).identity != identity
    monkeypatch.setattr(letters, "GLYPHS", dataclasses.replace(glyphs, hands=glyphs.hands[1:]))
    assert list_dataset(letters_config(per_class=1)).identity != identity


# ---- writing: which class draws each character ----------------------------------------------------


def letters_table() -> list[dict]:
    return [{"key": key, "fields": letters.class_fields(key), "prompt": key} for key in letters.KEYS]


def test_case_pairs_of_one_shape_count_as_one_in_recognition():
    classes = [ImageClass(key, letters.class_fields(key)) for key in letters.KEYS]
    groups = shape_groups(classes).tolist()
    index = {key: k for k, key in enumerate(letters.KEYS)}
    same = {key for key in letters.KEYS if groups[index[key]] != index[key]}  # the second of each pair
    assert same == {f"small_{c}" for c in "cosvwxz"}
    assert all(groups[index[f"small_{c}"]] == index[f"capital_{c.upper()}"] for c in "cosvwxz")
    assert groups[index["small_a"]] != groups[index["capital_A"]] and groups[index["digit_0"]] != groups[index["small_o"]]
    # a source without shape fields: every class is its own
    assert shape_groups([ImageClass("0", {"name": "zero"}), ImageClass("1", {"name": "one"})]).tolist() == [0, 1]


def test_segment_spells_mixed_case_and_digits():
    table = letters_table()
    assert segment(table, "Hi 7") == [7, 26 + 8, None, 52 + 7]
    assert segment(table, "one") == [26 + 14, 26 + 13, 26 + 4]  # letters, not the digit named "one"


def test_unknown_characters_are_all_named():
    with pytest.raises(ValueError, match=r"no class draws 'é', '!', '\?' \(in 'Hé! ok\?!'\)\. Known characters: A B C") as error:
        segment(letters_table(), "Hé! ok?!")
    assert "names" not in str(error.value)  # a letters run spells every one-word name itself
    digits = [{"key": str(d), "fields": {"name": n, "symbol": str(d)}, "prompt": n}
              for d, n in enumerate("zero one two three four five six seven eight nine".split())]
    with pytest.raises(ValueError, match=r"no class draws 'x', 'y' \(in '2x y'\).*class names separated by spaces: eight"):
        segment(digits, "2x y")


@pytest.mark.parametrize("text, error, message", [
    ("", ValueError, r"write\(\) has nothing to draw in '': give it at least one character, e.g. write\(\"2026\"\)$"),
    (" \t ", ValueError, r"write\(\) has nothing to draw in ' \\t ': give it"),
    (2026, TypeError, r"write\(\) takes the text as a string, e.g. write\(\"2026\"\); got int 2026$"),
    (None, TypeError, r"write\(\) takes the text as a string, e.g. write\(\"2026\"\); got NoneType None$"),
], ids=["empty", "blank", "number", "none"])
def test_text_with_nothing_to_write_is_refused(text, error, message):
    """Before: "" and blank text gave a blank image, as if the model drew nothing; a number gave "no len()"."""
    with pytest.raises(error, match=message):
        segment(letters_table(), text)


@pytest.mark.parametrize("field, value, message", [
    ("gap", -500, r"LineLayout gap must be a whole number of pixels >= 0 \(or None: the default\), got -500$"),
    ("margin", 1.5, r"LineLayout margin must be a whole number of pixels >= 0 \(or None: the default\), got 1.5$"),
    ("threshold", 255, r"LineLayout threshold must be a number in \[0, 254\], got 255$"),
    ("x_height", 0.0, r"LineLayout x_height must be a number in \[0.05, 1.0\], got 0.0$"),
], ids=["gap", "margin", "threshold", "x_height"])
def test_a_layout_that_cannot_be_drawn_is_refused(field, value, message):
    """Before: gap=-500 stopped in PIL ("Width and height must be >= 0"); threshold 255 found no ink in any glyph."""
    with pytest.raises(ValueError, match=message):
        LineLayout(**{field: value})


# ---- writing: the layout ------------------------------------------------------------------------


def block(cell: int, left: int, top: int, right: int, bottom: int, value: int = 200) -> PIL.Image.Image:
    """A synthetic glyph: a `cell`-pixel black image with a solid block of ink."""
    pixels = np.zeros((cell, cell), np.uint8)
    pixels[top:bottom, left:right] = value
    return PIL.Image.fromarray(pixels)


def test_widths_come_from_each_glyphs_ink_and_gaps_are_fixed():
    cell = 20
    images = [block(cell, 3, 2, 9, 18), block(cell, 5, 4, 15, 16, value=50), block(cell, 0, 0, 4, 20)]
    line = np.asarray(lay_out_line(["H", "I", "7"], images, cell, LineLayout(gap=2, threshold=40)))
    # margin 2 | H: 6 wide | gap 2 | I: 10 wide | gap 2 | 7: 4 wide | margin 2
    assert line.shape == (cell, 2 + 6 + 2 + 10 + 2 + 4 + 2)
    assert np.flatnonzero(line.max(0)).tolist() == [*range(2, 8), *range(10, 20), *range(22, 26)]
    ink_rows = lambda x0, x1: np.flatnonzero(line[:, x0:x1].max(1)).tolist()  # noqa: E731
    assert ink_rows(2, 8) == list(range(4, 20))  # every glyph's ink ends on the baseline (y = cell)
    assert ink_rows(10, 20) == list(range(8, 20))
    assert ink_rows(22, 26) == list(range(0, 20))
    assert (line[8:20, 10:20] == 50).all()  # pixels are copied, not redrawn
    faint = np.asarray(lay_out_line(["I"], [images[1]], cell, LineLayout(gap=2, threshold=60)))
    assert faint.shape == (cell, 2 + round(0.25 * cell) + 2)  # below the threshold: blank, but it takes room


def test_spaces_are_word_gaps_and_default_spacing_scales_with_the_cell():
    cell = 32
    images = [block(cell, 10, 4, 20, 28)] * 3
    line = np.asarray(lay_out_line(["A", None, "B", "C"], images, cell))
    gap, word = cell // 8, cell // 2  # defaults: 4 and 16
    assert line.shape == (cell, gap + 10 + word + 10 + gap + 10 + gap)
    assert np.flatnonzero(line.max(0)).tolist() == [*range(4, 14), *range(30, 40), *range(44, 54)]
    two_spaces = lay_out_line(["A", None, None, "B"], images[:2], cell)
    assert two_spaces.width == gap + 10 + 2 * word + 10 + gap


def test_small_letters_sit_at_x_height_and_descenders_hang_below():
    cell = 20
    full = block(cell, 0, 0, 10, 20)  # ink filling the cell's height: 10 x 20
    layout = LineLayout(gap=0, margin=0, x_height=0.5, descender=0.3)
    line = np.asarray(lay_out_line(["T", "o", "i", "g"], [full] * 4, cell, layout))
    drop = round(0.3 * cell)  # 6
    assert line.shape == (cell + drop, 10 + 5 + 8 + 10)  # the line is taller by the descender
    rows = lambda x0, x1: np.flatnonzero(line[:, x0:x1].max(1)).tolist()  # noqa: E731
    assert rows(0, 10) == list(range(0, 20))  # T: full height, on the baseline
    assert rows(10, 15) == list(range(10, 20))  # o: half height (x_height 0.5), on the baseline
    assert rows(15, 23) == list(range(5, 20))  # i: half-way between x-height and full (0.75)
    assert rows(23, 33) == list(range(6, 26))  # g: full height, ending 6 pixels below the baseline
    without = lay_out_line(["T", "o"], [full] * 2, cell, layout)
    assert without.height == cell  # no descender, no extra room


def test_vertical_roles_of_latin_digits_and_devanagari():
    assert [vertical_role(c) for c in "Ab7xtgj"] == ["tall", "tall", "tall", "x-height", "short", "descender", "descender"]
    assert vertical_role("क्ष") == "hanging" and vertical_role("७") == "tall"
    cell = 20
    line = np.asarray(lay_out_line(["क", "७"], [block(cell, 0, 3, 8, 15)] * 2, cell, LineLayout(gap=0, margin=0)))
    assert np.flatnonzero(line[:, :8].max(1)).tolist() == list(range(0, 12))  # a letter hangs from the top
    assert np.flatnonzero(line[:, 8:].max(1)).tolist() == list(range(8, 20))  # a digit sits on the baseline


# ---- a letters run, end to end --------------------------------------------------------------------


def test_evaluate_can_train_its_classifier_on_the_held_out_font(tmp_path, monkeypatch):
    """classifier_trained_on: holdout: the evaluator learns from the held-out font's renders only, and its
    ceiling is its accuracy on the other fonts (the training split)."""
    import pipelines.quality as quality
    from common.data import load_train_and_holdout

    config = tiny_config(tmp_path / "run", "data.name=letters", "data.per_class=6", "evaluate.classifier_trained_on=holdout")
    train_set, holdout_set = load_train_and_holdout(config.data)
    assert len(holdout_set) == 62 and {listing_font(holdout_set, i) for i in range(len(holdout_set))} == {"indie-flower"}
    seen = []
    real_images = quality.real_images
    monkeypatch.setattr(quality, "real_images", lambda dataset: seen.append(dataset) or real_images(dataset))
    model, ceiling = quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert seen == [holdout_set, train_set]  # learns from the held-out font, measured on the other five
    predicted, _ = quality.classify(model, real_images(train_set), torch.device("cpu"))
    groups = quality.shape_groups(train_set.classes)  # c/C & co. count as one shape
    assert ceiling == groups[predicted].eq(groups[train_set.labels]).float().mean().item()
    seen.clear()
    assert quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))[1] == ceiling and seen == []  # cached
    config.evaluate.classifier_trained_on = "train"
    quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert seen == [train_set, holdout_set]  # another choice, another classifier


def test_the_classifier_can_also_learn_print_fonts_the_model_never_sees(tmp_path, monkeypatch):
    """evaluate.classifier_print_fonts: the held-out hand's renders plus every class in the print fonts
    (a classifier of its own in the cache); for another dataset the key is refused."""
    import pipelines.quality as quality
    from common.data import load_train_and_holdout

    monkeypatch.setattr(letters, "PRINT_PER_CLASS", 2)
    config = tiny_config(tmp_path / "run", "data.name=letters", "data.per_class=6", "evaluate.classifier_trained_on=holdout",
                         "evaluate.classifier_print_fonts=true")
    train_set, holdout_set = load_train_and_holdout(config.data)
    printed, printed_labels = quality.print_font_images(holdout_set)
    assert printed.shape == (124, 1, 16, 16) and printed.min() >= -1 and printed.max() <= 1  # fitted to data.image_size
    assert printed_labels.tolist() == [k for k in range(62) for _ in range(2)]
    printed_for, learned_from = [], []
    monkeypatch.setattr(quality, "print_font_images", lambda dataset: printed_for.append(dataset) or (printed, printed_labels))
    real_images = quality.real_images
    monkeypatch.setattr(quality, "real_images", lambda dataset: learned_from.append(dataset) or real_images(dataset))
    quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert printed_for == [holdout_set] and learned_from == [holdout_set, train_set]  # + the ceiling on the five hands
    quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert learned_from == [holdout_set, train_set]  # cached: the same renders key the same classifier
    config.evaluate.classifier_print_fonts = False  # the cached one learned print fonts: not reused without them
    quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert len(learned_from) == 4 and len(printed_for) == 2
    config.evaluate.classifier_print_fonts = True  # and the other way round
    quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert len(learned_from) == 6
    printed = printed.flip(-1)  # other renders (another font, count or jitter): another classifier
    quality.train_classifier(config, train_set, holdout_set, torch.device("cpu"))
    assert len(learned_from) == 8
    with pytest.raises(ConfigError, match=re.escape("'evaluate.classifier_print_fonts' only the letters dataset has "
                                                    "print fonts to learn from, not 'mnist'; set it to false")):
        tiny_config(tmp_path / "mnist", "evaluate.classifier_print_fonts=true")


def test_every_print_font_draws_every_class_and_a_missing_file_is_named(monkeypatch):
    assert hands_per_class(letters.PRINTED) == tuple(tuple(range(len(letters.PRINT_FONTS))) for _ in range(62))
    broken = dataclasses.replace(letters.PRINT_FONTS[0], paths=("mpl-data/fonts/ttf/DejaVuSans.ttf", "mpl-data/nothere.ttf"))
    with pytest.raises(DatasetError, match=re.escape("the font 'dejavu-sans' is missing from ") + ".*"
                       + re.escape(": mpl-data/nothere.ttf; reinstall the package (pip install --force-reinstall matplotlib)")):
        broken.files()


def listing_font(dataset: ImageDataset, i: int) -> str:
    return dataset.listing.fonts[dataset.rows[i]]


def test_a_tiny_letters_run_writes_sentences(tmp_path):
    from ldm.encode import main as encode_main
    from ldm.train import main as ldm_main
    from ldm.train_clip import main as clip_main
    from pipelines import LatentPipeline
    from vae.train import main as vae_main

    run = tmp_path / "run"
    config = tiny_config(run, "data.name=letters", "data.per_class=6", "clip.vocab_size=1000",
                         'ldm.validation_prompts=["Write a capital A", "Write a small a"]')
    for stage in (clip_main, vae_main, encode_main, ldm_main):
        stage(config)
    pipe = LatentPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.classes) == 62 and pipe.classes[26]["prompt"] == "Write a small a"
    line = pipe.write("Hi jo", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert line.height == 16 + round(0.3 * 16)  # j hangs below the line
    images = pipe(["Write a capital H", "Write a small i", "Write a small j", "Write a small o"], num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(np.asarray(line), np.asarray(lay_out_line(["H", "i", None, "j", "o"], images, 16)))
    with pytest.raises(ValueError, match="no class draws '!'"):
        pipe.write("Hi!")
