import json
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import DataConfig
from common.data import ImageDataset, StepBatches, augment_batch, fit_image, list_dataset, load_split, to_mode
from common.data.pixels import load_image
from common.errors import DatasetError


def folder_config(path, **kwargs) -> DataConfig:
    return DataConfig(name="", path=str(path), **kwargs)


def test_mnist_is_offline_real_digits_with_a_per_class_holdout():
    listing = list_dataset(DataConfig(name="mnist"))
    labels, holdout = np.array(listing.labels), np.array(listing.holdout)
    assert len(labels) == 5000 and len(listing.classes) == 10
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        assert holdout[members].sum() == 50
        assert holdout[members[-50:]].all()  # the last 10% of each class
    train = ImageDataset(DataConfig(name="mnist"), "train")
    item = train[0]
    assert item["pixel_values"].shape == (1, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["pixel_values"].max() > 0.9 and item["pixel_values"].min() == -1.0  # white digit on black
    assert "Draw a six" in train.captions and "a handwritten 6" in train.captions
    six = train.labels.index(6)
    assert {train.captions[i] for i in train.caption_ids[six]} >= {"Draw a six", "the digit six"}


def test_class_folders_with_odd_sizes_and_mixed_modes(class_folder):
    for channels in (1, 3):
        dataset = load_split(folder_config(class_folder, image_size=16, channels=channels, holdout_fraction=0.34), "all")
        assert [c.key for c in dataset.classes] == ["circle", "square", "triangle"]
        assert len(dataset) == 18 and sum(dataset.holdout) == 6  # floor(6 * 0.34) = 2 per class
        for i in range(len(dataset)):
            assert dataset[i]["pixel_values"].shape == (channels, 16, 16)
        assert "Draw a square" in dataset.captions


def test_train_test_folders_hold_out_the_test_folder(tmp_path, class_folder):
    root = tmp_path / "dhcd"
    for split, count in [("Train", 4), ("Test", 2)]:
        for name in ["character_1_ka", "digit_3"]:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (32, 32), 255 * (i % 2)).save(root / split / name / f"{i}.png")
    dataset = ImageDataset(folder_config(root), "holdout")
    assert len(dataset) == 4
    assert all("Test" in dataset.listing.sources[r] for r in dataset.rows)
    assert {"Draw the letter ka", "क", "Draw the Devanagari digit three", "३"} <= set(dataset.captions)


def test_class_index_files(flowers_folder):
    dataset = ImageDataset(folder_config(flowers_folder, channels=3, image_size=32, fit="crop"), "all")
    assert [c.key for c in dataset.classes] == ["orchids", "tulips"]
    assert "Draw a tulips" in dataset.captions and "orchids" in dataset.captions
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)


def test_hidden_files_are_not_images_of_the_dataset(class_folder, flowers_folder):
    """Before: macOS's `._name.png` metadata files were read as images (refused with data.on_bad_image=error, a
    warning otherwise), and in the class_index layout a hidden `.name_1.png` made a class of its own."""
    for kind in ("circle", "square", "triangle"):
        (class_folder / kind / "._000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(100))  # AppleDouble
    dataset = load_split(folder_config(class_folder, on_bad_image="error"), "all")
    assert len(dataset) == 18 and not any("/._" in source for source in dataset.listing.sources)
    (flowers_folder / "._tulips_0000.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(100))
    (flowers_folder / ".backup_0001.jpg").write_bytes((flowers_folder / "tulips_0001.jpg").read_bytes())
    assert [c.key for c in list_dataset(folder_config(flowers_folder)).classes] == ["orchids", "tulips"]


def test_one_image_reached_twice_through_links_is_refused(class_folder, flowers_folder):
    """Before: a linked class folder became a second class of the same images, and a file linked twice counted twice."""
    (class_folder / "circle2").symlink_to(class_folder / "circle", target_is_directory=True)
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(class_folder))
    assert str(error.value) == (f"class folders '{class_folder / 'circle'}' and '{class_folder / 'circle2'}' are the same "
                                f"folder (one links to the other): its images would be two classes at once; remove the "
                                f"link, or copy the images if two classes are meant")
    (class_folder / "circle2").unlink()
    first = sorted((class_folder / "square").iterdir())[0]
    (class_folder / "triangle" / "linked.png").symlink_to(first)
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(class_folder))
    assert str(error.value) == (f"'{first}' and '{class_folder / 'triangle' / 'linked.png'}' are the same image file "
                                f"('{first.resolve()}', reached through a link): it would count twice, possibly in two "
                                f"classes or in both splits; remove one of them, or copy the file if two entries are meant")
    tulip = flowers_folder / "tulips_0001.jpg"
    (flowers_folder / "orchids_0099.jpg").symlink_to(tulip)
    with pytest.raises(DatasetError, match="are the same image file"):
        list_dataset(folder_config(flowers_folder))


def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path):
    """Before: a photo stored sideways with an EXIF Orientation tag (as phones save them) was trained on sideways."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # the white half on the left as stored; Orientation 6 turns it to the top
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(2):
        Image.fromarray(stored).save(root / "a" / f"{i}.jpg", exif=exif, quality=95)
    pixels = load_split(folder_config(root, image_size=16, fit="stretch", holdout_fraction=0.0), "all")[0]["pixel_values"][0]
    assert pixels[:8].mean() > 0.9 and pixels[8:].mean() < -0.9  # white on top, black below


def test_a_photo_with_a_malformed_exif_tag_is_read_upright(tmp_path):
    """Before: ImageOps.exif_transpose rewrote the EXIF block and raised struct.error on a tag whose value has the
    wrong type (here SMinSampleValue, a number, holding text), which no bad-image handling caught: the scan crashed."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0131] = "sw"  # Software (text), renamed below to SMinSampleValue
    raw = exif.tobytes().replace(b"\x01\x31\x00\x02", b"\x01\x55\x00\x02")
    for i in range(2):
        Image.fromarray(stored).save(root / "a" / f"{i}.jpg", exif=raw, quality=95)
    config = folder_config(root, image_size=16, fit="stretch", holdout_fraction=0.0, on_bad_image="error")
    pixels = load_split(config, "all")[0]["pixel_values"][0]
    assert pixels[:8].mean() > 0.9 and pixels[8:].mean() < -0.9  # white on top, black below


def test_metadata_jsonl_free_captions(jsonl_folder):
    dataset = ImageDataset(folder_config(jsonl_folder, channels=3, image_size=16), "all")
    assert dataset.classes == [] and all(label == -1 for label in dataset.labels)
    assert dataset.captions[dataset.caption_ids[4][0]] == "a bright square number 4"
    assert sum(dataset.holdout) == 1  # floor(12 * 0.1)


def test_metadata_jsonl_refuses_paths_outside_the_folder(jsonl_folder):
    (jsonl_folder / "metadata.jsonl").write_text(json.dumps({"file_name": "../x.png", "text": "escape"}) + "\n")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        list_dataset(folder_config(jsonl_folder))


def test_metadata_jsonl_captions_may_hold_unicode_line_separators(jsonl_folder):
    """Before: the file was split with str.splitlines, which also breaks at U+2028, U+2029 and U+0085 inside a
    caption (valid JSON, written raw by json.dumps(..., ensure_ascii=False)): the line was refused as 'not valid
    JSON (Unterminated string starting at)'."""
    captions = ["a red\u2028circle", "a\u2029square", "a\x85triangle"]
    for unlisted in range(len(captions), 12):
        (jsonl_folder / "images" / f"{unlisted}.png").unlink()
    (jsonl_folder / "metadata.jsonl").write_bytes("\r\n".join(
        json.dumps({"file_name": f"images/{i}.png", "text": text}, ensure_ascii=False)
        for i, text in enumerate(captions)).encode("utf-8"))
    assert list_dataset(folder_config(jsonl_folder)).texts == [[text] for text in captions]


def test_metadata_jsonl_saved_with_a_byte_order_mark_is_read(jsonl_folder):
    """Before: a file saved by a Windows editor, which starts with a UTF-8 byte-order mark, was refused: 'line 1 is
    not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))'."""
    path = jsonl_folder / "metadata.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    listing = list_dataset(folder_config(jsonl_folder))
    assert len(listing.sources) == 12 and listing.texts[0] == ["a bright circle number 0"]


def test_metadata_jsonl_file_name_with_a_nul_character_names_the_line(jsonl_folder):
    """Before: a file_name holding "\\u0000" crashed with a bare 'ValueError: embedded null byte', no line named."""
    path = jsonl_folder / "metadata.jsonl"
    path.write_text(path.read_text() + json.dumps({"file_name": "images/1.png\0.png", "text": "a circle"}) + "\n")
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(jsonl_folder))
    assert str(error.value) == (f"{path}: line 13: file_name 'images/1.png\\x00.png' contains a NUL character (\\u0000), "
                                f"which no file name can hold; write the image's path relative to '{jsonl_folder}'")


@pytest.mark.parametrize("folders, named, more", [(["data"], "data", ""),
                                                  (["test", "train"], "train", " (and 1 more like it)")])
def test_metadata_jsonl_below_the_top_of_data_path_is_refused(tmp_path, folders, named, more):
    """Before: with metadata.jsonl one folder down (data/metadata.jsonl beside its images), 'data' was read
    silently as the one class of a class dataset, the captions ignored; with Hugging Face's split layout
    (train/metadata.jsonl, test/metadata.jsonl) the listing said 'no images of a supported type'."""
    for folder in folders:
        (tmp_path / folder).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / folder / "0.png")
        (tmp_path / folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a dot"}) + "\n")
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(tmp_path))
    assert str(error.value) == (
        f"'{tmp_path / named / 'metadata.jsonl'}' is not at the top of data.path '{tmp_path}', where metadata.jsonl "
        f"is read, so its captions would be ignored{more}. Point data.path at '{tmp_path / named}', or write one "
        f"'{tmp_path / 'metadata.jsonl'}' whose file_name paths start with '{named}/' (data.holdout_fraction sets "
        f"the held-out share)")


def test_metadata_jsonl_refuses_images_it_does_not_list(jsonl_folder):
    """Before: images in the folder with no line in metadata.jsonl were left out of training without a word
    (Hugging Face's imagefolder refuses them: "image at ... doesn't have metadata")."""
    for name in ("images/extra.png", "more/b.PNG", "more/a.jpg"):
        (jsonl_folder / name).parent.mkdir(exist_ok=True)
        (jsonl_folder / name).write_bytes((jsonl_folder / "images" / "0.png").read_bytes())
    (jsonl_folder / "images" / "._0.png").write_bytes(b"macOS metadata")  # hidden: no image of the dataset
    (jsonl_folder / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(jsonl_folder))
    assert str(error.value) == (f"3 image(s) in '{jsonl_folder}' have no line in {jsonl_folder / 'metadata.jsonl'}: "
                                f"images/extra.png, more/a.jpg, more/b.PNG; they would be left out of training. Add a "
                                f"line with the caption of each, or move them out of the folder")


def replace_line(path, index: int, line: str) -> None:
    """Line `index` (from 0) of the text file `path` replaced by `line`."""
    lines = path.read_text().splitlines()
    lines[index] = line
    path.write_text("\n".join(lines) + "\n")


def test_metadata_jsonl_line_with_a_key_twice_is_refused(jsonl_folder):
    """Before: {"file_name": ..., "text": "a cat", "text": "a dog"} kept only "a dog" (JSON keeps the last), the
    other caption dropped without a word."""
    path = jsonl_folder / "metadata.jsonl"
    replace_line(path, 1, '{"file_name": "images/1.png", "text": "a cat", "text": "a dog", "extra": {"k": 1, "k": 2}}')
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(jsonl_folder))
    assert str(error.value) == (f"{path}: line 2 gives 'text' twice, and JSON would keep only the last; write it once "
                                f"(several captions as a list: \"text\": [\"...\", \"...\"])")


def test_metadata_jsonl_caption_with_half_a_surrogate_pair_names_the_line(jsonl_folder):
    """Before: a caption with an unpaired "\\ud83d" escape (valid JSON syntax, no character) was listed, and
    train-clip crashed on it with 'UnicodeEncodeError: surrogates not allowed', naming no line."""
    path = jsonl_folder / "metadata.jsonl"
    replace_line(path, 4, '{"file_name": "images/4.png", "text": ["a square", "a smile \\ud83d"]}')
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(jsonl_folder))
    assert str(error.value) == (f"{path}: line 5: 'text' of 'images/4.png' holds '\\ud83d', half of a UTF-16 surrogate "
                                f"pair with no partner, which is no character; write the character itself (or both "
                                f"halves of its escape), or delete it")
    replace_line(path, 4, '{"file_name": "images/4.png", "text": "a smile \\ud83d\\ude00"}')  # both halves: one character
    assert list_dataset(folder_config(jsonl_folder)).texts[4] == ["a smile \U0001f600"]


@pytest.mark.parametrize("line, kind", [('[{"file_name": "images/0.png", "text": "a circle"}]', "an array"),
                                        ('"images/0.png"', "a string"), ("3", "a number"), ("null", "null")])
def test_metadata_jsonl_line_that_is_no_object_says_so(jsonl_folder, line, kind):
    """Before: a line holding a JSON array (the whole dataset written as one array), a string or a number was
    refused as "needs both 'file_name' and 'text' keys", which it seemed to have."""
    path = jsonl_folder / "metadata.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError) as error:
        list_dataset(folder_config(jsonl_folder))
    assert str(error.value) == (f"{path}: line 1 is {kind}, not a JSON object; metadata.jsonl holds one object per "
                                f"line (JSON Lines), like {{\"file_name\": \"a.png\", \"text\": \"a red circle\"}}")


def test_modes_and_fits():
    sixteen_bit = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    assert sixteen_bit.mode.startswith("I;16")
    assert np.asarray(to_mode(sixteen_bit, 1)).max() > 200  # scaled down from 16 bits, not clipped to white
    assert to_mode(Image.new("CMYK", (4, 4)), 3).mode == "RGB"
    transparent = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert np.asarray(to_mode(transparent, 1)).max() == 0  # transparent becomes black
    wide = Image.new("L", (40, 10), 255)
    padded = np.asarray(fit_image(wide, 20, "pad"))
    assert padded.shape == (20, 20) and padded[0].max() == 0 and padded[10].min() == 255  # letterboxed
    assert np.asarray(fit_image(wide, 20, "crop")).min() == 255  # centre square of the white bar


@pytest.mark.parametrize("name", ["a.gif", "a.png", "a.tiff"])
def test_an_animated_or_multi_page_image_is_its_first_frame(tmp_path, name):
    """Documented (README, load_image): the frame viewers show before playing; the test pins it."""
    frames = [Image.new("L", (8, 8), 40), Image.new("L", (8, 8), 255)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / name) as image:
        assert image.n_frames == 2
    assert load_image(str(tmp_path / name), 8, 1, "pad").tolist() == np.full((8, 8, 1), 40).tolist()


def test_a_16_bit_png_with_a_transparent_grey_is_black_there_like_every_mode(tmp_path):
    """Before: the 16-bit conversion dropped the PNG's tRNS value, so its transparent pixels stayed white, while
    transparency becomes black in L, RGB, palette, LA and RGBA images."""
    array = np.full((4, 4), 65535, np.uint16)
    array[0] = 30000
    Image.fromarray(array).save(tmp_path / "a.png", transparency=65535)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "I;16" and image.info["transparency"] == 65535
        for channels in (1, 3):
            grey = np.asarray(to_mode(image, channels))
            assert grey[1:].max() == 0 and grey[0].min() == 116  # transparent rows black; 30000 / 65535 of 255 kept


def test_batch_augmentation_is_seeded_and_keeps_a_black_background():
    from common.config import AugmentConfig

    images = torch.full((4, 1, 16, 16), -1.0)
    images[:, :, 6:10, 6:10] = 1.0  # a white square on black
    assert augment_batch(images, AugmentConfig()) is images  # nothing configured: untouched
    config = AugmentConfig(rotate_degrees=15, translate=0.1, scale=0.1)
    torch.manual_seed(0)
    a = augment_batch(images, config)
    torch.manual_seed(0)
    b = augment_batch(images, config)
    assert torch.equal(a, b) and a.shape == images.shape
    assert not torch.equal(a[0], a[1])  # each image its own draw
    assert a[:, :, 0, 0].max() < -0.99  # corners stay black, not grey
    ramp = (torch.arange(4.0) / 3 * 2 - 1).view(1, 1, 1, 4).expand(8, 1, 4, 4)  # dark left, bright right
    torch.manual_seed(1)
    flipped = augment_batch(ramp, AugmentConfig(hflip=True))
    mirrored = [torch.allclose(f, r.flip(-1), atol=1e-5) for f, r in zip(flipped, ramp)]
    kept = [torch.allclose(f, r, atol=1e-5) for f, r in zip(flipped, ramp)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_step_batches_are_resumable_and_disjoint_across_ranks():
    full = StepBatches(100, 8, seed=3, world_size=1)
    resumed = StepBatches(100, 8, seed=3, start_step=5, world_size=1)
    assert next(iter(resumed)) == full.indices(5)
    ranks = [StepBatches(100, 8, seed=3, rank=r, world_size=2).indices(0) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    # one epoch visits every image once
    seen = [i for step in range(13) for i in full.indices(step)][:100]
    assert sorted(seen) == list(range(100))


def test_an_epochs_order_goes_to_a_gpu_from_pinned_memory_without_blocking(monkeypatch):
    """torch copies pageable host memory to a GPU and then synchronises the stream, so the host waits for every
    kernel queued so far. A new epoch's order is pinned and copied without blocking: where a batch is most of
    the data (configs/mnist-gpu.yaml: 4,096 of 4,500) that happens nearly every step. Before: a plain .to(device).
    (On the CPU the copies are recorded, not made; tests/test_devices.py runs such steps on a GPU under
    torch.cuda.set_sync_debug_mode('error').)"""
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pinned") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: copies.append((str(device), non_blocking)) or self)
    batches = StepBatches(10, 4, seed=0)
    rows = batches.index_tensor(2, 0, torch.device("cuda"))  # items 8-11: the end of epoch 0, the start of epoch 1
    assert copies == ["pinned", ("cuda", True), "pinned", ("cuda", True)]
    monkeypatch.undo()
    assert rows.tolist() == batches.indices(2)
    assert batches.index_tensor(2, 0, "cpu").tolist() == rows.tolist()


@pytest.mark.parametrize("channels", [3, 1])
def test_training_images_held_on_the_device_or_streamed_give_the_same_batches(class_folder, monkeypatch, channels):
    """A step's images and rows are the same whether the dataset is held on the device or read by a DataLoader,
    and are the DataLoader's own items (pixels.to_tensor), bit for bit and in the same memory layout (which
    picks the convolution kernels), at every micro-batch of a resumed run."""
    import common.data.batching as batching

    config = DataConfig(name="", path=str(class_folder), image_size=16, channels=channels, holdout_fraction=0)
    dataset = load_split(config, "train")
    held = batching.TrainingImages(dataset, StepBatches(len(dataset), 5, seed=1, start_step=2, grad_accum=2), "cpu")
    monkeypatch.setattr(batching, "fits_on", lambda device, nbytes: False)
    streamed = batching.TrainingImages(dataset, StepBatches(len(dataset), 5, seed=1, start_step=2, grad_accum=2), "cpu")
    assert held.resident is not None and held.resident.dtype == torch.uint8 and streamed.resident is None
    size = {3: "0.0132 MB", 1: "0.00439 MB"}[channels]  # 18 x 16 x 16 x channels bytes
    assert (held.describe(), streamed.describe()) == (f"held on cpu ({size})", f"read from disk each step ({size})")
    for step in (2, 3, 4):
        for micro in (0, 1):
            (a, rows_a), (b, rows_b) = held.batch(step, micro), streamed.batch(step, micro)
            assert rows_a.tolist() == rows_b.tolist() == held.sampler.indices(step, micro)
            assert torch.equal(a, b) and a.dtype == torch.float32 and a.stride() == b.stride()
            assert torch.equal(a, torch.stack([dataset[i]["pixel_values"] for i in rows_a.tolist()]))


def test_caption_draw_is_uniform_per_image_and_the_per_image_draw_it_replaced():
    """One kernel for a whole batch: on the CPU it gives, number for number, what torch.randint(count, ()) gave
    image by image (so CPU runs train as before), for images with 1, 2, 3 and 5 captions."""
    from common.data.captions import CaptionDraw, caption_table

    caption_ids = [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    assert caption_table(caption_ids).tolist()[:2] == [[0, -1, -1, -1, -1], [1, 2, -1, -1, -1]]
    draw = CaptionDraw(caption_ids, "cpu")
    assert draw.draw_range == 30
    rows = torch.tensor([3, 0, 1, 2, 3, 4, 2] * 300)
    torch.manual_seed(7)
    chosen = draw(rows)
    torch.manual_seed(7)
    one_by_one = [caption_ids[r][torch.randint(len(caption_ids[r]), ())] for r in rows.tolist()]
    assert chosen.tolist() == one_by_one
    for r in range(5):  # every caption of every image is drawn, and only its own
        assert set(chosen[rows == r].tolist()) == set(caption_ids[r])
    assert CaptionDraw([[0]] + [[i] * n for i, n in enumerate(range(2, 60))], "cpu").draw_range == 2**62


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_dataset(folder_config(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        list_dataset(folder_config(tmp_path / "empty"))
    (tmp_path / "classes" / "cats").mkdir(parents=True)
    with pytest.raises(DatasetError, match="cats"):
        list_dataset(folder_config(tmp_path / "classes"))


def test_metadata_jsonl_name_in_the_other_unicode_form_finds_its_file(jsonl_folder):
    """Before: a file saved under macOS's decomposed (NFD) name, named in metadata.jsonl in the composed (NFC) form
    editors write, was 'does not exist' though it is there."""
    decomposed, composed = unicodedata.normalize("NFD", "café.png"), unicodedata.normalize("NFC", "café.png")
    assert decomposed != composed
    (jsonl_folder / "images" / "3.png").rename(jsonl_folder / "images" / decomposed)
    replace_line(jsonl_folder / "metadata.jsonl", 3, json.dumps({"file_name": f"images/{composed}", "text": "a cafe"}))
    listing = list_dataset(folder_config(jsonl_folder))
    assert listing.sources[3] == str(jsonl_folder / "images" / decomposed) and listing.texts[3] == ["a cafe"]
    assert len(listing.sources) == 12
