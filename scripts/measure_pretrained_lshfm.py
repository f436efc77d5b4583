"""Issue 12: the LSHFM notebook's embedded setting from scratch vs from the zoo (pretrained backbones,
teacher trained with early stopping), over development seeds.

    cd /work/main && KAVIZ_DATA=/tmp/helper_lshfm/data OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 PYTHONHASHSEED=0 \
        .venv/bin/python scripts/measure_pretrained_lshfm.py --seeds 0 1 2 --variants scratch pretrained \
        --teacher-epochs 30 --patience 5 --teacher-lr 2e-3
    # the recommended setting (students 15 epochs with patience 3), on the development seeds:
    ... scripts/measure_pretrained_lshfm.py --seeds 0 1 2 --variants pretrained --teacher-lr 2e-3 \
        --student-epochs 15 --student-patience 3
    # print the summary of saved runs again: ... --summarize run1.csv run2.csv

For each variant and seed s: the teacher (vgg8_small width 16, multi-label BCE) trained with seed s, then
the notebook's five students (bce, l2, lsh, lshl2, kd; vgg8_small width 8) with seed s, everything else as
the notebook's parameter cell (``kaviz.compare.PAPERS["lshfm"]``). "scratch" is the notebook exactly;
"pretrained" starts teacher and students from the zoo (``pretrained=True``) and trains the teacher until its
validation value (the notebook's monitor: validation BCE, unless ``--teacher-monitor``) has not improved for
``--patience`` epochs, ``--teacher-epochs`` at most. Prints per-seed rows (with the teacher's validation
curve), mean ± sample std (ddof=1) per variant, and the headline margins (LSHL2 − L2, LSHL2 − BCE in units of
the pooled std, as ``kaviz.report.compare`` computes them). One thread.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

DATA = dict(n=2500, image_size=32, max_objects=2, seed=0)           # the notebook's N_IMAGES, ... (SEEDS[0])
TEACHER, TEACHER_KW = "vgg8_small", {"width": 16}
STUDENT, STUDENT_KW = "vgg8_small", {"width": 8}
TEACHER_EPOCHS, EPOCHS, STAGE1_EPOCHS = 8, 5, 1
BATCH, LR, TEACHER_LR = 32, 3e-3, 2e-3
OPTIMIZER, SCHEDULE, WEIGHT_DECAY = "adam", "cosine", 5e-4
BETA, BETA1, BIAS, N_HASHES = 0.5, 1.0, "median", None
VARIANTS = ["bce", "l2", "lsh", "lshl2", "kd"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    ap.add_argument("--teacher-epochs", type=int, default=30, help="pretrained: the maximum (and cosine horizon)")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--min-delta", type=float, default=0.0)
    ap.add_argument("--teacher-lr", type=float, default=TEACHER_LR, help="pretrained teacher's lr")
    ap.add_argument("--teacher-monitor", default=None, help="pretrained teacher: e.g. val/mAP (default: the "
                    "notebook's, validation BCE)")
    ap.add_argument("--student-epochs", type=int, default=EPOCHS, help="pretrained students' stage-2 epochs")
    ap.add_argument("--student-lr", type=float, default=LR, help="pretrained students' lr")
    ap.add_argument("--student-patience", type=int, default=None, help="pretrained students: early stopping")
    ap.add_argument("--out", default="/tmp/helper_lshfm/measure_pretrained_lshfm.csv")
    ap.add_argument("--summarize", nargs="+", default=None, help="only print the summary of these CSV files")
    args = ap.parse_args()
    if args.summarize:
        summarize(pd.concat([pd.read_csv(f) for f in args.summarize], ignore_index=True))
        return
    import kaviz
    from kaviz.methods import lshfm
    from kaviz.train import train_teacher

    kaviz.seed_everything(0, threads=1)
    torch.set_num_threads(1)
    train, val, test = lshfm.load_data("embedded", **DATA)
    ncls = len(train.classes)
    rows = []
    for v in args.variants:
        pre = v == "pretrained"
        tkw = {**TEACHER_KW, "pretrained": True} if pre else dict(TEACHER_KW)
        skw = {**STUDENT_KW, "pretrained": True} if pre else dict(STUDENT_KW)
        tset = dict(epochs=TEACHER_EPOCHS, lr=TEACHER_LR)
        sset = dict(epochs=EPOCHS, lr=LR)
        if pre:
            tset = dict(epochs=args.teacher_epochs, lr=args.teacher_lr, patience=args.patience,
                        min_delta=args.min_delta)
            if args.teacher_monitor:
                tset["monitor"] = args.teacher_monitor
            sset = dict(epochs=args.student_epochs, lr=args.student_lr)
            if args.student_patience:
                sset["patience"] = args.student_patience
        for s in args.seeds:
            t0 = time.perf_counter()
            teacher, th = train_teacher(TEACHER, train, val, num_classes=ncls, batch_size=BATCH, optimizer=OPTIMIZER,
                                        schedule=SCHEDULE, weight_decay=WEIGHT_DECAY, loss="bce",
                                        target_key="labels", arch_kwargs=tkw, seed=s, device="cpu", progress=False,
                                        **tset)
            t_sec = time.perf_counter() - t0
            curve = " ".join(f"{m:.3f}" for m in th["val/mAP"])
            lcurve = " ".join(f"{m:.3f}" for m in th["val/loss"])
            print(f"[{v} seed {s}] teacher {t_sec:.0f}s, best epoch {th.attrs.get('best_epoch')} of {len(th)} "
                  f"(stopped {th.attrs.get('stopped_epoch')}); val mAP: {curve}; val loss: {lcurve}", flush=True)
            train_c, val_c = lshfm.teacher_outputs(train, teacher), lshfm.teacher_outputs(val, teacher)
            settings = dict(num_classes=ncls, arch_kwargs=skw, stage1_epochs=STAGE1_EPOCHS, beta=BETA, beta1=BETA1,
                            bias=BIAS, n_hashes=N_HASHES, batch_size=BATCH, optimizer=OPTIMIZER, schedule=SCHEDULE,
                            weight_decay=WEIGHT_DECAY, device="cpu", progress=False, **sset)
            runs = {(sv, s): lshfm.run(sv, STUDENT, teacher, train_c, val_c, seed=s, **settings) for sv in VARIANTS}
            _, scores = lshfm.results_table(runs, test, teacher)
            row = {"variant": v, "seed": s, "teacher": float(scores.loc[scores.variant == "teacher", "mAP"].iloc[0]),
                   "t epochs": len(th), "t best": th.attrs.get("best_epoch"),
                   "t val mAP": float(th["val/mAP"].iloc[th.attrs["best_epoch"] - 1])}
            for (sv, _), r in runs.items():
                row[sv] = float(scores.loc[scores.variant == sv, "mAP"].iloc[0])
                h = r.history
                row[f"{sv} best"] = h.attrs.get("best_epoch")
                row[f"{sv} last"] = int(h["epoch"].iloc[-1])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
            curves = {sv: " ".join(f"{m:.3f}" for m in r.history["val/mAP"]) for (sv, _), r in runs.items()}
            print(f"[{v} seed {s}] student val mAP per epoch: {curves}", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    summarize(df)


def summarize(df):
    from kaviz.report import compare

    cols = ["teacher", "t epochs", "t best", "t val mAP", *VARIANTS, "seconds"]
    g = df.groupby("variant", sort=False)[cols]
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print("mean:")
        print(g.mean().round(4).to_string())
        print("sample std (ddof=1):")
        print(g.std(ddof=1).round(4).to_string())
        print("teacher max - min over seeds:")
        tg = df.groupby("variant", sort=False)["teacher"]
        print((tg.max() - tg.min()).round(4).to_string())
        print("students: best epoch == last epoch (count of seeds):")
        still = {sv: df.assign(x=df[f"{sv} best"] == df[f"{sv} last"]).groupby("variant", sort=False)["x"].sum()
                 for sv in VARIANTS}
        print(pd.DataFrame(still).to_string())
    for v, d in df.groupby("variant", sort=False):
        for a, b in (("lshl2", "l2"), ("lshl2", "bce")):
            c = compare(f"{a} > {b}", d[a].tolist(), d[b].tolist(), a_name=a, b_name=b)
            print(f"{v}: {a} − {b} = {c.difference:+.4f}, margin {c.margin_std:+.2f} std -> {c.verdict}")


if __name__ == "__main__":
    main()
