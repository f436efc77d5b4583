"""kaviz's default recombination bottleneck against the reference code's (docs/decisions.md, "Recombination ·
bottleneck"; SPEC.md §4.3).

On the recombination notebook's embedded setting (1000 scenes of 32 px, teachers of widths (16, 32, 64) trained
with the notebook's QUICK recipe and seed 0, quantiser step 0.25, 3 pruning rounds of 30 %, one epoch of
(re)training per round at lr 1e-3, batch 16), runs ``recombine`` for seeds 0, 1, 2 with

* ``default``:   the full-width identity 1×1 bottleneck (kaviz's default), and
* ``reference``: ``bottleneck="reference"`` (16 channels: 1×1 conv, BN, LeakyReLU, 1×1 conv, then the quantiser;
  per-task adaptors 1×1 conv, BN, LeakyReLU, 1×1 conv), its random initialisation drawn from the seed,

and prints, per variant, the test PSNR, SSIM, mIoU, bpp, parameter count and code width after combining +
fine-tuning (round 0) and after the last round's retraining: mean ± sample std (ddof = 1) over the seeds.
The teachers are the same for every seed (as the notebook's ``SEEDS`` loop); the seed moves the data order of
every (re)training and, for the reference variant, the initialisation of its new layers.

Run: ``KAVIZ_DATA=/tmp/kaviz-data OMP_NUM_THREADS=1 python scripts/measure_recombination_bottleneck.py``
(one thread; ``--rounds N`` and ``--seeds 0 1 2`` change the schedule).
"""
import argparse
import time

import kaviz
from kaviz.methods import recombination as rc

# the notebook's embedded QUICK setting (notebooks/recombination.ipynb, first cell)
N_IMAGES, IMAGE_SIZE, WIDTHS = 1000, 32, (16, 32, 64)
AE_TRAIN = dict(epochs=4, lr=2e-3, batch_size=16)
SEG_TRAIN = dict(epochs=12, lr=1e-2, batch_size=16)
QUANT_STEP, FRACTION = 0.25, 0.3
RETRAIN = dict(epochs=1, finetune_epochs=1, lr=1e-3, batch_size=16)
VARIANTS = {"default": {}, "reference": {"bottleneck": "reference"}}
COLUMNS = ("psnr", "ssim", "mIoU", "bpp", "params", "code_channels")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    start = time.time()
    kaviz.seed_everything(0, threads=1)
    d = rc.load_splits("embedded", n=N_IMAGES, size=IMAGE_SIZE, seed=0)
    k = d["num_classes"]
    ae, _ = rc.train_dense_teacher("reconstruction", d["train"], d["val"], widths=WIDTHS, seed=0, progress=False,
                                   **AE_TRAIN)
    seg, _ = rc.train_dense_teacher("segmentation", d["train"], d["val"], num_classes=k, widths=WIDTHS, seed=0,
                                    progress=False, **SEG_TRAIN)
    teachers = {"reconstruction": ae, "segmentation": seg}
    print(f"teachers ready after {time.time() - start:.0f} s")
    print(rc.teacher_scores(teachers, d["test"]).round(4).to_string(index=False))
    for name, opts in VARIANTS.items():
        t0 = time.time()
        results = [rc.recombine(teachers, d["train"], d["val"], d["test"], rounds=args.rounds, fraction=FRACTION,
                                quant_step=QUANT_STEP, seed=seed, progress=False, **RETRAIN, **opts)
                   for seed in args.seeds]
        s = rc.summarize(results, split="test")
        rows = s[(s["stage"] == "fine-tuned") | ((s["stage"] == "retrained") & (s["round"] == args.rounds))]
        print(f"\n{name} bottleneck {opts or ''}: seeds {args.seeds}, {time.time() - t0:.0f} s")
        for _, r in rows.iterrows():
            cells = "  ".join(f"{c} {r[c]:.4g} ± {r[c + '_std']:.2g}" for c in COLUMNS)
            print(f"  round {r['round']} {r['stage']:10s} {cells}")
        for seed, res in zip(args.seeds, results):
            t = res.table("test")
            last = t.iloc[-1]
            ft = t[t["stage"] == "fine-tuned"].iloc[0]
            print(f"    seed {seed}: fine-tuned psnr {ft['psnr']:.3f} ssim {ft['ssim']:.4f} mIoU {ft['mIoU']:.4f} "
                  f"bpp {ft['bpp']:.3f} | last psnr {last['psnr']:.3f} ssim {last['ssim']:.4f} "
                  f"mIoU {last['mIoU']:.4f} bpp {last['bpp']:.3f} params {int(last['params'])}")
    print(f"\nwall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
