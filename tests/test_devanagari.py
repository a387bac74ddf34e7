import warnings

import numpy as np
import PIL.features
import pytest

import common.data.glyph_render as glyph_render
from common.checkpoint import CheckpointWriteError
from common.config import DataConfig
from common.data import ImageDataset, list_dataset
from common.data.devanagari import CLASSES, GLYPHS, HANDS, render_dataset, render_glyph
from common.data.glyph_render import Hand, hands_per_class, missing_glyph, why_not_drawn
from common.errors import DatasetError

HAS_RAQM = bool(PIL.features.check("raqm"))
needs_raqm = pytest.mark.skipif(not HAS_RAQM, reason="Pillow here has no libraqm (text shaping), so the "
                                "Devanagari conjuncts cannot be rendered")


def _without_raqm(monkeypatch):
    """Make Pillow report that libraqm is missing (as on a Pillow built without it)."""
    check = PIL.features.check
    monkeypatch.setattr(PIL.features, "check", lambda feature: False if feature == "raqm" else check(feature))


def test_grid_labels_that_need_shaping_warn_without_raqm(monkeypatch):
    """Before: without libraqm, labels such as "Draw क्ष" were drawn unshaped (the virama after the letter) silently."""
    from PIL import Image

    from common.images import make_grid

    tiles = [Image.new("L", (8, 8))] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where none is due
        if HAS_RAQM:
            make_grid(tiles, 1, row_labels=["Draw क्ष", "Draw कि"])
        _without_raqm(monkeypatch)
        make_grid(tiles, 2, column_labels=["Draw ka", "Draw क"])  # letters without marks need no shaping
    with pytest.warns(UserWarning, match=r"^grid labels with Devanagari vowel signs or conjuncts are drawn without text "
                                         r"shaping \(this Pillow has no libraqm\), so those marks sit after their "
                                         r"letters; install a Pillow built with raqm \(the PyPI wheels include it: "
                                         r"pip install --force-reinstall pillow\)$"):
        make_grid(tiles, 1, row_labels=["Draw क्ष", "Draw कि"])


@needs_raqm
def test_46_classes_with_romanized_and_devanagari_captions(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dataset = ImageDataset(DataConfig(name="devanagari", per_class=3, holdout_fraction=0.34), "all")
    assert len(dataset.classes) == 46 and len(dataset) == 46 * 3
    assert [c.key for c in dataset.classes[:2]] == ["character_1_ka", "character_2_kha"]
    assert dataset.classes[-1].key == "digit_9"
    assert sum(dataset.holdout) == 46  # floor(3 * 0.34) = 1 per class
    captions = set(dataset.captions)
    assert {"Draw the letter ka", "क", "Draw the Devanagari digit three", "३", "क्ष", "ज्ञ"} <= captions
    image = dataset[0]["pixel_values"]
    assert image.shape == (1, 32, 32) and image.min() == -1.0 and image.max() > 0.5  # white on black


@needs_raqm
def test_rendering_is_deterministic_by_seed_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, fonts = render_dataset(2, seed=0, processes=1)
    assert a.shape == (92, 32, 32) and a.dtype == np.uint8 and fonts.shape == (92,)
    assert list(tmp_path.rglob("devanagari-*.npz"))  # cached for the next command
    b, fonts_b = render_dataset(2, seed=0, processes=1)
    assert np.array_equal(a, b) and np.array_equal(fonts, fonts_b)
    c, _ = render_dataset(2, seed=1, processes=1)
    assert not np.array_equal(a, c)
    # every image has ink, and the images of one class differ (a hand's variation)
    assert (a.reshape(92, -1).max(1) > 128).all()
    assert not np.array_equal(a[0], a[1])


@needs_raqm
def test_conjuncts_are_shaped():
    for conjunct in ["क्ष", "त्र", "ज्ञ"]:
        shaped = render_glyph(conjunct, np.random.default_rng(0))
        unshaped = render_glyph(conjunct, np.random.default_rng(0), shaping=False)
        assert np.abs(shaped.astype(int) - unshaped.astype(int)).mean() > 10
    assert len({text for _, _, text in CLASSES}) == 46


def test_rendering_without_raqm_is_refused(tmp_path, monkeypatch):
    _without_raqm(monkeypatch)
    with pytest.raises(DatasetError, match="needs Pillow with libraqm.*pip install --force-reinstall pillow"):
        render_glyph("क्ष", np.random.default_rng(0))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DatasetError, match="libraqm"):
        render_dataset(1, seed=0, processes=1)
    assert not list(tmp_path.rglob("devanagari-*.np*"))  # nothing wrong was cached
    # unshaped rendering (the tests' own comparison) still works
    assert render_glyph("क", np.random.default_rng(0), shaping=False).shape == (32, 32)


@needs_raqm
def test_cached_render_loads_without_raqm(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rendered, _ = render_dataset(1, seed=0, processes=1)
    _without_raqm(monkeypatch)
    assert np.array_equal(render_dataset(1, seed=0, processes=1)[0], rendered)


@needs_raqm
def test_full_disk_only_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def full_disk(path, data):
        raise CheckpointWriteError(f"could not save '{path}': the disk is full. The previous checkpoint is intact")

    monkeypatch.setattr(glyph_render, "write_bytes", full_disk)
    with pytest.warns(UserWarning, match="disk is full.*rendering works, but will be redone next time"):
        pixels, _ = render_dataset(1, seed=0, processes=1)
    assert pixels.shape == (46, 32, 32) and pixels.dtype == np.uint8 and pixels.max() > 128
    assert not list(tmp_path.rglob("devanagari-*.np*"))


@needs_raqm
def test_unwritable_cache_folder_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder cannot be created under a file, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="could not cache the rendered devanagari dataset"):
        pixels, _ = render_dataset(1, seed=0, processes=1)
    assert pixels.shape == (46, 32, 32)


# ---- several fonts ---------------------------------------------------------------------------------


def test_fonts_lacking_a_glyph_are_found():
    """A font without a glyph draws its .notdef box (Caveat: a crossed rectangle) or nothing (Indie Flower's
    .notdef is empty); either way it does not draw the character."""
    assert "has no glyph for 'क' (U+0915): it draws its .notdef box" == missing_glyph(Hand("caveat", "fontpkg_caveat"), "क")
    assert "draws nothing for 'क' (U+0915)" == missing_glyph(Hand("indie-flower", "fontpkg_indie_flower"), "क")
    assert missing_glyph(Hand("caveat", "fontpkg_caveat"), "क्ष") is not None  # one missing part is enough
    for hand in HANDS:
        assert missing_glyph(hand, "क्ष") is None and missing_glyph(hand, "ज्ञ") is None


def test_every_class_is_drawn_by_the_fonts_that_really_draw_it():
    """Noto, Kalam and Mukta draw all 46 classes; Hind draws the digits ०-९ as the Western 0-9, so it draws
    only the 36 letters."""
    drawers = hands_per_class(GLYPHS)
    names = [hand.name for hand in HANDS]
    assert names == ["noto-sans-devanagari", "kalam", "hind", "mukta"]
    assert all(drawers[k] == (0, 1, 2, 3) for k in range(36))
    assert all(drawers[k] == (0, 1, 3) for k in range(36, 46))
    assert why_not_drawn(GLYPHS, 39, 2).startswith("draws '३' as a copy of '3'")


def test_a_font_that_draws_nothing_for_a_class_is_refused_when_no_other_does():
    caveat_only = glyph_render.GlyphSet("test", 1, ("क", "A"), (Hand("caveat", "fontpkg_caveat"),))
    with pytest.raises(DatasetError, match="no font of the test dataset draws 'क': caveat has no glyph for 'क'"):
        hands_per_class(caveat_only)


@needs_raqm
def test_each_image_records_its_font_and_the_fonts_take_turns(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    listing = list_dataset(DataConfig(name="devanagari", per_class=4, holdout_fraction=0.25))
    assert len(listing.fonts) == 46 * 4
    assert listing.fonts[:4] == ["noto-sans-devanagari", "kalam", "hind", "mukta"]  # ka
    assert listing.fonts[36 * 4:37 * 4] == ["noto-sans-devanagari", "kalam", "mukta", "noto-sans-devanagari"]  # ०
    assert "hind" not in listing.fonts[36 * 4:]
    assert sum(listing.holdout) == 46  # the last quarter of each class
    by_font = list_dataset(DataConfig(name="devanagari", per_class=4, holdout_font="kalam"))
    assert by_font.holdout == [font == "kalam" for font in by_font.fonts] and sum(by_font.holdout) == 46
    assert by_font.identity != listing.identity
    with pytest.raises(DatasetError, match="'hind' does not draw ० १ २ ३ ४ ५ ६ ७ ८ ९"):
        list_dataset(DataConfig(name="devanagari", per_class=4, holdout_font="hind"))


def test_a_holdout_font_not_of_the_dataset_is_refused_before_rendering(monkeypatch):
    """Before: every glyph was rendered (minutes at per_class=400) before the font's name was checked."""
    def render(*args, **kwargs):
        raise AssertionError("rendered before the holdout font was checked")

    monkeypatch.setattr(glyph_render, "render_classes", render)
    monkeypatch.setattr("common.data.devanagari.render_classes", render)
    with pytest.raises(DatasetError, match=r"^data.holdout_font='caveat' is not a font of the devanagari dataset; use one "
                                           r"of 'noto-sans-devanagari', 'kalam', 'hind', 'mukta'$"):
        list_dataset(DataConfig(name="devanagari", per_class=400, holdout_font="caveat"))
