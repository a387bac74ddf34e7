import numpy as np
import PIL.features
import pytest

import common.data.devanagari as devanagari
from common.checkpoint import CheckpointWriteError
from common.config import DataConfig
from common.data import ImageDataset
from common.data.devanagari import CLASSES, render_dataset, render_glyph
from common.errors import DatasetError

HAS_RAQM = bool(PIL.features.check("raqm"))
needs_raqm = pytest.mark.skipif(not HAS_RAQM, reason="Pillow here has no libraqm (text shaping), so the "
                                "Devanagari conjuncts cannot be rendered")


def _without_raqm(monkeypatch):
    """Make Pillow report that libraqm is missing (as on a Pillow built without it)."""
    check = PIL.features.check
    monkeypatch.setattr(PIL.features, "check", lambda feature: False if feature == "raqm" else check(feature))


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
    assert not list(tmp_path.rglob("devanagari-*.npy"))  # nothing wrong was cached
    # unshaped rendering (the tests' own comparison) still works
    assert render_glyph("क", np.random.default_rng(0), shaping=False).shape == (32, 32)


@needs_raqm
def test_cached_render_loads_without_raqm(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rendered = render_dataset(1, seed=0, processes=1)
    _without_raqm(monkeypatch)
    assert np.array_equal(render_dataset(1, seed=0, processes=1), rendered)


@needs_raqm
def test_full_disk_only_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def full_disk(path, data):
        raise CheckpointWriteError(f"could not save '{path}': the disk is full. The previous checkpoint is intact")

    monkeypatch.setattr(devanagari, "write_bytes", full_disk)
    with pytest.warns(UserWarning, match="disk is full.*rendering works, but will be redone next time"):
        pixels = render_dataset(1, seed=0, processes=1)
    assert pixels.shape == (46, 32, 32) and pixels.dtype == np.uint8 and pixels.max() > 128
    assert not list(tmp_path.rglob("devanagari-*.npy"))


@needs_raqm
def test_unwritable_cache_folder_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder cannot be created under a file, even as root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="could not cache the rendered Devanagari dataset"):
        pixels = render_dataset(1, seed=0, processes=1)
    assert pixels.shape == (46, 32, 32)
