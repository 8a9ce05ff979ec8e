"""The demo's data: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download)."""
from __future__ import annotations

import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 8, 8] in [-1, 1], labels [1797] int64 in 0..9)."""
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    return images * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.int64)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches (a fresh permutation every epoch)."""
    while True:
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0] - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield images[index], labels[index]
