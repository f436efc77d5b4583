"""Issue 12: the CFL notebook's embedded setting from scratch vs from the zoo (pretrained backbones,
teachers trained with early stopping), over development seeds.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_pretrained_cfl.py --seeds 0 1 2
    # the notebook's choice, on the development seeds:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_pretrained_cfl.py --seeds 0 1 2 --variants pretrained \
        --patience 5 --teacher-lr 3e-3

For each variant and seed s: both teachers trained with seed s (test accuracy on their own classes),
then a KD and a CFL student (vgg8_small, width 4) with seed s. Prints per-seed rows and mean ± sample
std; the teacher spread over seeds is what issue 12 asks to bring within 0.01.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

TEACHERS = {
    "shapes": dict(arch="mobilenet_small", arch_kwargs={"width": 8, "head_width": 32}, layer="head",
                   epochs=6, lr=1e-2, batch_size=32),
    "digits": dict(arch="cifar_resnet8", arch_kwargs={"width": 8}, layer="layer3",
                   epochs=8, lr=3e-3, batch_size=32),
}
STUDENT, STUDENT_KW, STUDENT_LAYER = "vgg8_small", {"width": 4}, "features"
SETTINGS = dict(epochs=6, batch_size=64, lr=2e-3, hidden=16, weights={"kd": 1.0, "mmd": 10.0, "recon": 10.0},
                head_lr_mult=10.0, block_lr_mult=5.0, cache_teachers=True, val_losses=False)


def variant(name: str, teacher_epochs: int, patience: int | None, teacher_lr_scale: float, teacher_lr=None):
    pre = name.startswith("pretrained")
    teachers = {}
    for k, t in TEACHERS.items():
        t = dict(t)
        if pre:
            t["arch_kwargs"] = {**t["arch_kwargs"], "pretrained": True}
            t["epochs"], t["patience"], t["lr"] = teacher_epochs, patience, t["lr"] * teacher_lr_scale
            if teacher_lr:
                t["lr"] = teacher_lr
        teachers[k] = t
    student_kw = {**STUDENT_KW, "pretrained": True} if pre else dict(STUDENT_KW)
    return teachers, student_kw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["scratch", "pretrained"])
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--teacher-lr-scale", type=float, default=1.0)
    ap.add_argument("--teacher-lr", type=float, default=None, help="one learning rate for both pretrained teachers "
                    "(instead of the scaled scratch ones); the notebook's choice: 3e-3")
    ap.add_argument("--out", default="/tmp/measure_pretrained_cfl.csv")
    args = ap.parse_args()
    from kaviz.methods import cfl, kd

    torch.set_num_threads(1)
    data = cfl.load_data("embedded", image_size=32, n_shapes=1500)
    rows = []
    for v in args.variants:
        tspecs, skw = variant(v, args.teacher_epochs, args.patience, args.teacher_lr_scale, args.teacher_lr)
        for s in args.seeds:
            t0 = time.perf_counter()
            specs = {k: {**t, "seed": s} for k, t in tspecs.items()}
            teachers, layers, hists = cfl.train_teachers(specs, data)
            tt = kd.teacher_accuracy(teachers, data.test)
            runs = cfl.run_students(STUDENT, teachers, STUDENT_LAYER, layers, data.train, data.val, data.test,
                                    seeds=[s], arch_kwargs=skw, **SETTINGS)
            ps = cfl.per_seed_table(runs)
            row = {"variant": v, "seed": s,
                   "teacher shapes": float(tt["task_aware"].iloc[0]), "teacher digits": float(tt["task_aware"].iloc[1]),
                   "teachers agnostic": float(tt["task_agnostic"].iloc[-1]),
                   "shapes epochs": len(hists["shapes"]), "digits epochs": len(hists["digits"]),
                   "shapes best": hists["shapes"].attrs.get("best_epoch"),
                   "digits best": hists["digits"].attrs.get("best_epoch")}
            for _, r in ps.iterrows():
                row[f"{r['method']} agnostic"] = float(r["test task-agnostic"])
                row[f"{r['method']} aware"] = float(r["test task-aware"])
                row[f"{r['method']} best"] = r.get("best epoch", None)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(row, flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    num = df.drop(columns=["seed"]).groupby("variant")
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(num.mean().round(3).to_string())
        print("sample std (ddof=1):")
        print(num.std(ddof=1).round(3).to_string())


if __name__ == "__main__":
    main()
