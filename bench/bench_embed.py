"""Time kaviz.embed on the size the notebooks use: 3 sources x 1000 points of 256-D features.

Prints wall-clock seconds per call (best of ``--repeat``), the quality numbers, and the machine
load, because on a shared 2-core machine other processes change the timings a lot.

    .venv/bin/python bench/bench_embed.py [--repeat 2] [--umap]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def features(n=1000, dim=256, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(classes, dim))
    y = rng.integers(0, classes, size=n)
    base = centres[y] + rng.normal(0, 1, size=(n, dim))
    # three "networks": the same images seen through slightly different feature extractors
    mix = [np.eye(dim) + rng.normal(0, 0.05, size=(dim, dim)) for _ in range(3)]
    return {f"net{k}": base @ m for k, m in enumerate(mix)}, y


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--umap", action="store_true", help="also time UMAP (numba compiles ~15 s)")
    args = ap.parse_args()

    from kaviz.embed import embed, pairing_distance

    feats, y = features()
    print(f"cpus={os.cpu_count()} load(1,5,15 min)={os.getloadavg()}")
    import openTSNE  # noqa: F401  (import time is not the embedding's)

    cases = [
        ("pca joint", dict(method="pca")),
        ("tsne joint n_jobs=auto", dict(method="tsne")),
        ("tsne joint n_jobs=1", dict(method="tsne", n_jobs=1)),
        ("tsne reference", dict(method="tsne", mode="reference", reference="net0")),
    ]
    if args.umap:
        cases += [("umap joint", dict(method="umap")),
                  ("umap reference", dict(method="umap", mode="reference", reference="net0"))]
    for name, kw in cases:
        sec, df = timed(lambda kw=kw: embed(feats, y, cache=False, **kw), args.repeat)
        print(f"{name:24s} {sec:6.2f} s  rows={len(df)}  "
              f"trustworthiness={df.attrs['trustworthiness']:.3f}  "
              f"knn_preservation={df.attrs['knn_preservation']:.3f}  "
              f"pairing={pairing_distance(df):.3f}")
    embed(feats, y, method="tsne")
    sec, _ = timed(lambda: embed(feats, y, method="tsne"), 3)
    print(f"{'tsne cache hit':24s} {sec:6.3f} s")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
