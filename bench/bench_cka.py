"""kaviz.analysis.cka_matrix against the two networks' plain forward passes, and its peak memory.

Target (issue 16): a layer × layer CKA matrix of two ResNet-18-sized torchvision models on 2,000
images at 64 px runs within 2× the time of the two networks' forward passes; its memory does not grow
with the number of images (minibatch CKA holds one batch of features).
    python bench/bench_cka.py [--threads 2] [--repeats 2] [--no-memory]
"""
import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import RandomImages, alternate  # noqa: E402

import kaviz  # noqa: E402
from kaviz.analysis import cka_matrix  # noqa: E402

LAYERS = ["maxpool", "layer1", "layer2", "layer3", "layer4", "fc:in"]


def resnet18(seed):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def peak_rss_mb(n: int, threads: int) -> float:
    """cka_matrix of two ResNet-18 on n lazily generated 64 px images in a fresh process; peak RSS in MB."""
    code = f"""
import os, sys, resource
sys.path.insert(0, {os.path.dirname(__file__)!r})
os.environ['CI'] = '1'
import torch, torchvision
from _common import RandomImages
from kaviz.analysis import cka_matrix
torch.set_num_threads({threads})
torch.manual_seed(0); a = torchvision.models.resnet18(weights=None).eval()
torch.manual_seed(1); b = torchvision.models.resnet18(weights=None).eval()
cka_matrix(a, b, RandomImages({n}, size=64), {LAYERS!r}, {LAYERS!r}, batch_size=250)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true")
    args = p.parse_args()
    os.environ["CI"] = "1"
    kaviz.seed_everything(0, threads=args.threads)
    a, b = resnet18(0), resnet18(1)
    data = RandomImages(args.n, size=64)
    images = torch.stack([data[i][0] for i in range(args.n)]) if not args.no_time else None  # both timings exclude it
    bs = args.batch_size

    def plain():
        with torch.no_grad():
            for i in range(0, args.n, bs):
                a(images[i:i + bs])
                b(images[i:i + bs])

    def cka():
        cka_matrix(a, b, images, LAYERS, LAYERS, batch_size=bs, progress=False)

    if not args.no_time:
        t = alternate({"plain": plain, "cka": cka}, args.repeats)
        print(f"cka_matrix  (2 x torchvision resnet18, {args.n} images at 64 px, {len(LAYERS)} x {len(LAYERS)} layers, "
              f"batch {bs}, {args.threads} threads): two plain forwards {t['plain']:.2f} s, cka_matrix {t['cka']:.2f} "
              f"s, "
              f"ratio {t['cka'] / t['plain']:.2f} (target <= 2)")
    if not args.no_memory:
        sizes = (500, 2000)
        mem = {n: peak_rss_mb(n, args.threads) for n in sizes}
        feat = sum((64 * 16 * 16, 64 * 16 * 16, 128 * 8 * 8, 256 * 4 * 4, 512 * 2 * 2, 512)) * 4 * 2 / 2**20
        print(f"cka_matrix peak memory ({feat * sizes[0]:.0f} -> {feat * sizes[1]:.0f} MB of features if they were "
              f"kept): {sizes[0]} images {mem[sizes[0]]:.0f} MB, {sizes[1]} images {mem[sizes[1]]:.0f} MB, "
              f"growth {mem[sizes[1]] - mem[sizes[0]]:+.0f} MB (target: flat)")


if __name__ == "__main__":
    main()
