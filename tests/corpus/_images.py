"""A small local stand-in for the cats-and-dogs archive a corpus script downloads: the same
``cats_and_dogs_filtered/{train,validation}/{cats,dogs}`` folders of RGB JPEG images that
torchvision's ``ImageFolder`` reads, where the class decides which half holds a bright patch, so
a few steps of training can separate them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = {"train": 16, "validation": 8}
SIZE = 64


def cats_and_dogs_dir() -> str:
    """An absolute folder holding ``cats_and_dogs_filtered``, written once per machine."""
    root = Path(tempfile.gettempdir()) / f"raylight-corpus-cats-dogs-{SIZE}"
    if not (root / "cats_and_dogs_filtered" / "validation" / "dogs").exists():
        # Written aside and renamed: two runs started side by side never read half a file.
        staging = Path(tempfile.mkdtemp(prefix="raylight-corpus-cats-dogs-"))
        rng = np.random.default_rng(3)
        for split, count in PER_CLASS.items():
            for label, name in enumerate(("cats", "dogs")):
                folder = staging / "cats_and_dogs_filtered" / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    image = rng.integers(0, 90, size=(SIZE, SIZE, 3), dtype=np.uint8)
                    left = label * SIZE // 2
                    image[8:-8, left + 4 : left + SIZE // 2 - 4] = 230
                    Image.fromarray(image).save(folder / f"{name}.{index}.jpg")
        try:
            os.rename(staging, root)
        except OSError:  # the other run got there first
            shutil.rmtree(staging, ignore_errors=True)
    return str(root)
