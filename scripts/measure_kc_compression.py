"""Knowledge consistency between a net and its magnitude-pruned copies (SPEC §3, compression use).

On the knowledge_consistency notebook's embedded setting (synthetic shapes, n=3000, seed 0 split;
vgg8_small width 8 trained 5 epochs, lr 3e-3, batch 64; layer features.11; the notebook's QUICK
Trans-Net schedule: 8 epochs, lr 3e-3, batch 16, 640 training features), for three originals
(seeds 0, 1, 2): prune at each sparsity (one global threshold by default), with and without a short
fine-tuning, and fit a Trans-Net in both directions at features.11. The reference point is an
independently trained net of another seed (original seed s vs seed (s + 1) mod 3), treated alike.
Prints test accuracy and the variance shares as mean ± sample std over the three originals.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_kc_compression.py [--cache DIR] [--scope global|layer]
        [--sparsities 0.5 0.8 0.95] [--fine-tune-epochs 0 2] [--seeds 0 1 2]

Without --cache everything (teachers, features) is computed in a fresh temporary folder, so the
printed wall time covers the whole experiment. One thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help="KAVIZ_DATA folder to use (default: a fresh temporary one)")
    p.add_argument("--scope", default="global", choices=["global", "layer"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    p.add_argument("--fine-tune-epochs", type=int, nargs="+", default=[0, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="kc-compression-")
        os.environ["KAVIZ_DATA"] = tmp.name
    else:
        os.environ["KAVIZ_DATA"] = args.cache
    os.environ.setdefault("CI", "1")  # no progress bars

    import pandas as pd
    import torch

    import kaviz
    from kaviz.methods import consistency as kc
    from kaviz.train import train_teacher

    t0 = time.time()
    kaviz.seed_everything(0, threads=1)
    torch.set_num_threads(1)
    # the notebook's parameter cell (embedded default)
    arch, arch_kwargs, layer = "vgg8_small", {"width": 8}, "features.11"
    fit_kw = dict(epochs=5, lr=3e-3, batch_size=64, arch_kwargs=arch_kwargs, progress=False)
    transnet = dict(epochs=8, lr=3e-3, batch_size=16, max_train=640)
    d = kc.load_data("embedded", n=3000, seed=0)
    nets = {s: train_teacher(arch, d.train, d.val, seed=s, **fit_kw)[0] for s in args.seeds}
    t_nets = time.time() - t0

    tables = []
    for i, s in enumerate(args.seeds):
        ref_seed = args.seeds[(i + 1) % len(args.seeds)]
        t = kc.compression_consistency(
            nets[s], d.train_features, d.val, d.test, layers=[layer], sparsities=args.sparsities,
            fine_tune_epochs=args.fine_tune_epochs, scope=args.scope, fine_tune=dict(lr=1e-3, batch_size=64),
            references={"independent seed": nets[ref_seed]}, transnet=transnet, seed=s, progress=False)
        t.insert(0, "seed", s)
        t["original_test_accuracy"] = t.attrs["original"]["test_accuracy"]
        tables.append(t)
        print(f"seed {s} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    raw = pd.concat(tables, ignore_index=True)

    cols = ["weight_sparsity", "test_accuracy", "share x^Δ", "share g(x_A)"] + \
        [c for c in raw.columns if c.startswith("share x⁽")]
    order = list(dict.fromkeys(raw["net"]))
    g = raw.groupby(["net", "direction"], sort=False)[cols]
    mean, std = g.mean(), g.std(ddof=1)
    summary = mean.copy().astype(object)
    for c in cols:
        summary[c] = [f"{m:.3f} ± {v:.3f}" for m, v in zip(mean[c], std[c])]
    summary = summary.reindex(order, level="net")
    orig = raw.groupby("seed")["original_test_accuracy"].first()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    print(f"knowledge consistency vs magnitude pruning ({args.scope}) at {arch} {layer}; {len(args.seeds)} originals "
          f"(seeds {args.seeds}); mean ± sample std over them; shares of Var(x_B) on the validation split; "
          "test accuracy of each net (fine-tuned: best-on-validation epoch)")
    print(f"original test accuracy: {orig.mean():.3f} ± {orig.std(ddof=1):.3f}")
    print(summary.to_string())
    # how a global threshold would distribute the pruning over the layers (one original)
    masks = kc.prune_masks(nets[args.seeds[0]], 0.8, scope="global")
    print("per-layer sparsity of a global 80 % threshold (seed "
          f"{args.seeds[0]}):", {n: round(1 - float(k.float().mean()), 3) for n, k in masks.items()})
    print(f"wall time: {time.time() - t0:.0f} s (training the {len(nets)} originals: {t_nets:.0f} s); threads: "
          f"{torch.get_num_threads()}")
    if tmp is not None:
        tmp.cleanup()
    return raw


if __name__ == "__main__":
    main()
