"""Worker for tests/test_distributed.py: the same tiny training, in one process or as one rank of
a gloo process group (torch.multiprocessing.spawn)."""
import os

import torch
from torch import nn

import kaviz
from kaviz.train import Supervised, fit


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return torch.utils.data.TensorDataset(x, y)


def train(checkpoint_dir=None):
    kaviz.seed_everything(0, threads=1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))  # no BN: per-rank statistics would differ
    hist = fit(Supervised(model), data(), data(), epochs=3, batch_size=8, lr=0.05, optimizer="sgd",
               checkpoint_dir=checkpoint_dir, restore="last")
    return model, hist


def rank_main(rank, world, init_file, out):
    os.environ["CI"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, hist = train()
        if rank == 0:
            torch.save({"model": model.state_dict(), "loss": torch.tensor(hist["train/loss"].values)}, out)
    finally:
        torch.distributed.destroy_process_group()
