"""Write a small, learnable MNIST to disk in the exact layout torchvision's ``MNIST`` loads.

torchvision 0.29 looks only for the extracted idx files under ``<root>/MNIST/raw/``
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``), checks that they exist (no checksum once extracted), and never
touches the network when they do. So these four files are all a test needs.
"""

import struct
from pathlib import Path

import numpy as np

IMAGE_SIDE = 28
NUM_CLASSES = 10


def _learnable_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 28, 28) uint8: a bright 6x6 square whose place encodes the class, shifted and noisy."""
    count = len(labels)
    images = rng.integers(0, 60, size=(count, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    # The 10 classes sit on a 4-wide grid of positions 6 px apart; a +-1 px jitter keeps
    # every square inside the 28x28 frame.
    rows = 3 + 6 * (labels // 4) + rng.integers(-1, 2, size=count)
    cols = 3 + 6 * (labels % 4) + rng.integers(-1, 2, size=count)
    for image, row, col in zip(images, rows, cols, strict=True):
        image[row : row + 6, col : col + 6] = rng.integers(180, 256, size=(6, 6), dtype=np.uint8)
    return images


def _write_idx(path: Path, array: np.ndarray) -> None:
    # idx header: two zero bytes, the dtype code (0x08 = uint8), the number of dims,
    # then each dim as a big-endian uint32.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: str | Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``n_train`` / ``n_test`` labelled images; return the ``MNIST/raw`` folder.

    Labels cycle through all 10 classes so that every split holds each of them.
    """
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(count) % NUM_CLASSES).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _learnable_images(labels, rng))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw
