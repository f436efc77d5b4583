"""Speed of the embedded datasets (target: 5,000 32x32 shapes well under 1 s), and of the real-format data
path against a plain torchvision ImageFolder + transforms.v2 baseline on the same JPEG files (target: ratio
>= 1.0).
    python bench/bench_data.py [--real-only] [--n 240] [--workers 0,1,2]
Prints the best of a few runs (the machine may be shared) in images per second, and the ratio for each
DataLoader worker count (0: read in the main process).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kaviz.data as D


def best(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def real_format(n: int = 240, size=(375, 500), image_size: int = 224, repeats: int = 5, workers=(0, 1, 2)):
    """images/s reading CUB-format JPEGs with the training transform (RandomResizedCrop 224 + flip +
    normalise), kaviz.data.real vs torchvision ImageFolder, through a DataLoader with each worker count
    in ``workers``; returns {workers: ratio}."""
    from PIL import Image
    from torchvision import datasets
    from torchvision.transforms import v2

    from kaviz.data import real

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_real import save_jpeg_variant

    rng = np.random.default_rng(0)
    h, w = size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "CUB_200_2011"
        n_classes = 4
        lines = {"images": [], "image_class_labels": [], "train_test_split": [], "bounding_boxes": [], "classes": []}
        y, x = np.mgrid[:h, :w]
        for i in range(1, n + 1):
            c = i % n_classes
            folder = f"{c + 1:03d}.Bird_{c + 1}"
            rel = f"{folder}/Bird_{i:05d}.jpg"
            # smooth shapes plus sensor-like noise: JPEG sizes like photographs (~30-60 kB at 500x375)
            base = np.stack([127 + 100 * np.sin((x + 7 * i) / (20 + c)), 127 + 100 * np.cos((y - 3 * i) / 17),
                             127 + 80 * np.sin((x + y) / 31)], -1)
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            save_jpeg_variant(root / "images" / rel, img, "gray" if i % 50 == 0 else "rgb")
            lines["images"].append(f"{i} {rel}")
            lines["image_class_labels"].append(f"{i} {c + 1}")
            lines["train_test_split"].append(f"{i} 1")
            lines["bounding_boxes"].append(f"{i} 10.0 10.0 {w - 20}.0 {h - 20}.0")
        lines["classes"] = [f"{c + 1} {c + 1:03d}.Bird_{c + 1}" for c in range(n_classes)]
        for name, rows in lines.items():
            (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
        kaviz_ds = real.cub200(root, "train", image_size=image_size)
        baseline_tf = v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
                                  v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                  v2.Normalize(real.IMAGENET_MEAN, real.IMAGENET_STD)])
        folder_ds = datasets.ImageFolder(str(root / "images"), transform=baseline_tf,
                                         loader=lambda p: Image.open(p).convert("RGB"))
        assert len(folder_ds) == len(kaviz_ds) == n

        def epoch(ds, num_workers):
            dl = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=num_workers)
            for xb, _ in dl:
                assert xb.shape[-2:] == (image_size, image_size)

        # the same kaviz dataset made to decode with PIL (a transform passed explicitly gets PIL images)
        kaviz_pil = kaviz_ds.with_transform(real.default_transform(image_size, train=True))
        paths = {"torchvision ImageFolder + v2 (PIL)": folder_ds, "kaviz.data.real.cub200": kaviz_ds,
                 "kaviz.data.real.cub200, PIL decoding": kaviz_pil}
        for ds in paths.values():
            epoch(ds, 0)  # warm (page cache, allocator)
        ratios = {}
        for nw in workers:
            # interleaved repeats, best of each: a shared machine's load swings hit every path alike
            times = {name: [] for name in paths}
            for _ in range(repeats):
                for name, ds in paths.items():
                    t0 = time.perf_counter()
                    epoch(ds, nw)
                    times[name].append(time.perf_counter() - t0)
            rates = {name: n / min(t) for name, t in times.items()}
            print(f"num_workers={nw} ({h}x{w} JPEG -> {image_size}, train transform, batch 32):")
            for name, r in rates.items():
                print(f"  {name:42s} {r:9.1f} images/s")
            ratios[nw] = rates["kaviz.data.real.cub200"] / rates["torchvision ImageFolder + v2 (PIL)"]
            print(f"  {'ratio kaviz / ImageFolder':42s} {ratios[nw]:9.2f}  target >= 1.0")
            print(f"  {'ratio decode_jpeg / PIL decoding (kaviz)':42s} "
                  f"{rates['kaviz.data.real.cub200'] / rates['kaviz.data.real.cub200, PIL decoding']:9.2f}")
        return ratios


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real-only", action="store_true", help="only the real-format data path")
    ap.add_argument("--n", type=int, default=240, help="JPEGs in the real-format benchmark")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts of the real-format benchmark")
    args = ap.parse_args()
    workers = tuple(int(w) for w in args.workers.split(",") if w.strip())
    torch.set_num_threads(1)
    if args.real_only:
        real_format(args.n, workers=workers)
        return
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
    real_format(args.n, workers=workers)


if __name__ == "__main__":
    main()
