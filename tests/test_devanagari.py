import numpy as np

from common.config import DataConfig
from common.data import ImageDataset
from common.data.devanagari import CLASSES, render_dataset, render_glyph


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


def test_rendering_is_deterministic_by_seed_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = render_dataset(2, seed=0, processes=1)
    assert a.shape == (92, 32, 32) and a.dtype == np.uint8
    assert list(tmp_path.rglob("devanagari-*.npy"))  # cached for the next command
    b = render_dataset(2, seed=0, processes=1)
    assert np.array_equal(a, b)
    c = render_dataset(2, seed=1, processes=1)
    assert not np.array_equal(a, c)
    # every image has ink, and the images of one class differ (a hand's variation)
    assert (a.reshape(92, -1).max(1) > 128).all()
    assert not np.array_equal(a[0], a[1])


def test_conjuncts_are_shaped():
    for conjunct in ["क्ष", "त्र", "ज्ञ"]:
        shaped = render_glyph(conjunct, np.random.default_rng(0))
        unshaped = render_glyph(conjunct, np.random.default_rng(0), shaping=False)
        assert np.abs(shaped.astype(int) - unshaped.astype(int)).mean() > 10
    assert len({text for _, _, text in CLASSES}) == 46
