import os

import pytest
import torch

os.environ.setdefault("CI", "1")  # no progress bars in tests


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


class TinyImages(torch.utils.data.Dataset):
    """Gaussian-blob 'images' whose class is the mean colour: learnable in a few steps."""

    def __init__(self, n=96, num_classes=3, size=8, seed=0, name="tiny"):
        # the class centres are the same for every seed: another seed is more data of the same task
        centres = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234)) * 2
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(n) % num_classes
        self.images = centres[self.targets] + 0.5 * torch.randn(n, 3, size, size, generator=g)
        self.num_classes = num_classes
        self.fingerprint = f"{name}-{n}-{num_classes}-{size}-{seed}"

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


@pytest.fixture
def tiny():
    return TinyImages()
