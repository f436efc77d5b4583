"""Subprocess for tests/test_train.py: trains a tiny model with checkpoints; optionally SIGKILLs
itself at a given global step (mid-epoch), or resumes, then writes the final weights."""
import os
import signal
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TinyImages  # noqa: E402

import kaviz  # noqa: E402
from kaviz.train import Supervised, fit  # noqa: E402


class KillAt(Supervised):
    def __init__(self, model, kill_step):
        super().__init__(model)
        self.kill_step = kill_step
        self.steps = 0

    def forward(self, batch):
        if self.training:
            self.steps += 1
            if self.steps == self.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(batch)


def main(ckpt, out, kill_step, resume):
    kaviz.seed_everything(0, threads=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    data = TinyImages(n=120)
    fit(KillAt(model, kill_step), data, TinyImages(n=30, seed=1), epochs=4, batch_size=16, lr=1e-2,
        schedule="cosine", checkpoint_dir=ckpt or None, resume=resume, restore="last", seed=3)
    torch.save(model.state_dict(), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
