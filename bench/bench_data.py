"""Speed of the embedded datasets (target: 5,000 32x32 shapes well under 1 s).
    python bench/bench_data.py
Prints the best of a few runs (the machine may be shared) in images per second.
"""
import time

import torch

import kaviz.data as D


def best(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    torch.set_num_threads(1)
    D.render_scenes(16, seed=0)  # warm the noise tile
    rows = [
        ("render_scenes 5000 x 32x32, 1 object", 5000, lambda: D.render_scenes(5000, seed=0, size=32)),
        ("render_scenes 3000 x 48x48, 1-4 objects", 3000,
         lambda: D.render_scenes(3000, seed=0, size=48, n_objects=(1, 4))),
        ("shapes(n=5000) (dataset + meta)", 5000, lambda: D.shapes(n=5000)),
        ("scenes(n=3000) (dataset + meta)", 3000, lambda: D.scenes(n=3000)),
        ("digits(size=32)", 1797, lambda: D.digits(size=32)),
    ]
    for name, n, fn in rows:
        t = best(fn, 3 if n < 5000 else 5)
        note = "  target < 1 s" if name.startswith("render_scenes 5000") else ""
        print(f"{name:42s} {t:6.3f} s  {n / t:9.0f} images/s{note}")
    ds = D.shapes(n=5000)
    t = best(lambda: sum(1 for _ in D.loader(ds, batch_size=64, shuffle=True)), 3)
    print(f"{'one loader epoch over shapes(5000), batch 64':42s} {t:6.3f} s  {5000 / t:9.0f} images/s")


if __name__ == "__main__":
    main()
