"""Subprocess for tests/test_train.py and tests/test_faults_cache.py: trains a tiny model with
checkpoints; optionally SIGKILLs itself at a given global step (mid-epoch) or in the middle of writing
the second ``last.pt`` (after its temporary file is complete, before the rename), or resumes; then
writes the final weights."""
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


def kill_in_second_checkpoint_write():
    real, seen = os.replace, []

    def replace(src, dst):
        if str(dst).endswith("last.pt"):
            seen.append(dst)
            if len(seen) == 2:  # epoch 2's temporary file is written in full and not yet renamed
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    os.replace = replace


def main(ckpt, out, kill_step, resume, train_seed=0):
    kaviz.seed_everything(0, threads=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    data = TinyImages(n=120, seed=train_seed)
    fit(KillAt(model, kill_step), data, TinyImages(n=30, seed=1), epochs=4, batch_size=16, lr=1e-2,
        schedule="cosine", checkpoint_dir=ckpt or None, resume=resume, restore="last", seed=3)
    torch.save(model.state_dict(), out)


if __name__ == "__main__":
    if len(sys.argv) > 5 and sys.argv[5] == "kill-in-write":
        kill_in_second_checkpoint_write()
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
