"""kaviz.train.fit(..., amp=True) against a hand-written autocast loop on the same model, data and optimiser.

On CPU, amp=True is bf16 autocast (no gradient scaler); on CUDA it is fp16 with torch.amp.GradScaler, and the
hand-written loop below does the same. Target (DESIGN.md §6): the loop adds at most 5 % over the hand-written
one. Prints the ratio (interleaved repeats, median of each, as bench/bench_train.py).
    python bench/bench_amp.py [--threads 2] [--repeats 8] [--device cpu]
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
from kaviz.features import amp_dtype  # noqa: E402
from kaviz.train import Supervised, fit  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--arch", default="vgg8_small")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    os.environ["CI"] = "1"
    kaviz.seed_everything(0, threads=args.threads)
    device = torch.device(args.device)
    dtype = amp_dtype(True, device)
    x = torch.rand(args.n, 3, 32, 32)
    y = torch.randint(0, 10, (args.n,))
    data = torch.utils.data.TensorDataset(x, y)
    model = models.build(args.arch, 10).to(device)
    epochs, bs = 1, 64

    def plain():
        g = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True, generator=g, drop_last=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        model.train()
        for _ in range(epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype):
                    loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()

    def kaviz_fit():
        fit(Supervised(model), data, epochs=epochs, batch_size=bs, lr=1e-3, progress=False, amp=True, device=device)

    t = alternate({"plain": plain, "kaviz": kaviz_fit}, args.repeats)
    ratio = t["kaviz"] / t["plain"]
    name = str(dtype).replace("torch.", "")
    print(f"amp loop    ({args.arch}, {args.n} images, batch {bs}, {name} autocast on {device.type}, "
          f"{args.threads} threads): hand-written {t['plain']:.3f} s, kaviz.fit(amp=True) {t['kaviz']:.3f} s, "
          f"ratio {ratio:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
