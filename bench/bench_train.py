"""kaviz.train.fit against a hand-written PyTorch loop on the same model, data and optimiser.

Target (DESIGN.md §6): the loop adds at most 5 % over the hand-written one. Prints the ratio.
    python bench/bench_train.py [--threads 2] [--repeats 5]
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import alternate  # noqa: E402

import kaviz  # noqa: E402
from kaviz import models  # noqa: E402
from kaviz.train import Supervised, fit  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--arch", default="vgg8_small")
    args = p.parse_args()
    os.environ["CI"] = "1"
    kaviz.seed_everything(0, threads=args.threads)
    x = torch.rand(args.n, 3, 32, 32)
    y = torch.randint(0, 10, (args.n,))
    data = torch.utils.data.TensorDataset(x, y)
    model = models.build(args.arch, 10)
    epochs, bs = 1, 64

    def plain():
        g = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True, generator=g, drop_last=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(epochs):
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def kaviz_fit():
        fit(Supervised(model), data, epochs=epochs, batch_size=bs, lr=1e-3, progress=False)

    t = alternate({"plain": plain, "kaviz": kaviz_fit}, args.repeats)
    ratio = t["kaviz"] / t["plain"]
    print(f"train loop  ({args.arch}, {args.n} images, batch {bs}, {args.threads} threads): "
          f"plain {t['plain']:.3f} s, kaviz.fit {t['kaviz']:.3f} s, ratio {ratio:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
