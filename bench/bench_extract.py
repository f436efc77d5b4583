"""kaviz.features.extract against plain forward passes, and peak memory of an on-disk store.

Targets (DESIGN.md §6): extraction adds at most 5 % over plain forward passes; with an on-disk
store, peak memory does not grow with the dataset size.
    python bench/bench_extract.py [--threads 2]
"""
import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import alternate  # noqa: E402

import kaviz  # noqa: E402
from kaviz import models  # noqa: E402
from kaviz.features import extract  # noqa: E402

# An early layer with large maps, (16, 32, 32) floats = 64 KB per image, so that keeping the features in
# memory visibly raises the peak while an on-disk store must not.
LAYER, LAYER_SHAPE = "features.1", (16, 32, 32)


def peak_rss_mb(n: int, store: bool) -> float:
    """Extract n lazily generated images in a fresh process; return its peak RSS in MB."""
    code = f"""
import os, sys, tempfile, resource
sys.path.insert(0, {os.path.dirname(__file__)!r})
os.environ['CI'] = '1'
import torch
from _common import RandomImages
from kaviz import models
from kaviz.features import extract
LAYER = {LAYER!r}
torch.set_num_threads(2)
m = models.build('vgg8_small', 10)
d = tempfile.mkdtemp() if {store} else None
s = extract(m, RandomImages({n}), [LAYER], pool='none', batch_size=128,
            store=(d + '/s') if d else None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    os.environ["CI"] = "1"
    kaviz.seed_everything(0, threads=args.threads)
    model = models.build("cifar_resnet14", 10).eval()
    x = torch.rand(2048, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(2048, dtype=torch.long)),
                                         batch_size=256)

    def plain():
        outs = []
        with torch.no_grad():
            for xb, _ in loader:
                outs.append(model(xb))
        return torch.cat(outs)

    def kaviz_extract():
        extract(model, loader, ["layer3", "fc:in"], pool="avg", progress=False)

    t = alternate({"plain": plain, "kaviz": kaviz_extract}, args.repeats)
    print(f"extract     (cifar_resnet14, 2048 images, 2 layers, {args.threads} threads): plain forward "
          f"{t['plain']:.3f} s, kaviz.extract {t['kaviz']:.3f} s, ratio {t['kaviz'] / t['plain']:.3f} (target <= 1.05)")
    sizes = (2000, 8000)
    mem = {n: peak_rss_mb(n, True) for n in sizes}
    ram = {n: peak_rss_mb(n, False) for n in sizes}
    feat_mb = {n: n * 4 * LAYER_SHAPE[0] * LAYER_SHAPE[1] * LAYER_SHAPE[2] / 2**20 for n in sizes}
    print(f"peak memory (vgg8_small {LAYER}, unpooled {feat_mb[sizes[0]]:.0f} -> {feat_mb[sizes[1]]:.0f} MB of "
          f"features): "
          f"on-disk store {mem[sizes[0]]:.0f} -> {mem[sizes[1]]:.0f} MB (ratio {mem[sizes[1]] / mem[sizes[0]]:.2f}, "
          f"target ~1.0); in memory {ram[sizes[0]]:.0f} -> {ram[sizes[1]]:.0f} MB")


if __name__ == "__main__":
    main()
