"""Issue 12: the layer-wise amalgamation notebook's embedded setting from scratch vs from the zoo (pretrained
backbones, teachers trained with early stopping), over development seeds.

    cd /work/main && KAVIZ_DATA=/tmp/helper_layerwise/data OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 PYTHONHASHSEED=0 \
        .venv/bin/python scripts/measure_pretrained_layerwise.py --seeds 0 1 2

The setting of notebooks/layerwise_amalgamation.ipynb (3000 synthetic 16×16 shapes, 10 classes cut into two
parts of 5, vgg8_small teachers of width 8, a vgg8_small student of width 8, stages (3, 3, 3) epochs at lr
(1e-2, 1e-2, 3e-3), one-stage variant and KD 6 epochs at lr 3e-3, batch 64), for two variants:

- ``scratch``: the notebook's exact settings (teachers 10 epochs at lr 3e-3 from scratch, students from scratch);
- ``pretrained``: teachers from the zoo entry ``vgg8_small-width=8`` trained with early stopping
  (``--teacher-epochs`` at most, ``--patience``, lr ``--teacher-lr``); every student (the layer-wise one, the
  one-stage variant and KD) starts from the same zoo entry (head re-initialised for the 10 classes), as the
  papers' students start from ImageNet weights (``--scratch-layerwise-student`` keeps the layer-wise student
  from scratch, to see whether its init matters: stage 2 refits every layer to the amalgamated features anyway).
  ``--stage-epochs``, ``--stage-lr``, ``--baseline-epochs``, ``--student-patience`` and ``--student-schedule``
  change the students' settings of this variant only.

The defaults of the pretrained variant are the settings chosen on development seeds 0-2 (teachers: at most 15
epochs, patience 5, lr 3e-3; students: stages (3, 8, 15) epochs at lr 1e-2 each, one-stage and KD 12 epochs,
patience 4, cosine schedule over each run's epochs); the alternatives tried were, e.g.:

    ... --teacher-epochs 30 --patience 5 --stage-epochs 3 3 3 --stage-lr 1e-2 1e-2 3e-3 --baseline-epochs 6 \
        --student-patience 0 --student-schedule none        # the notebook's student budget
    ... --teacher-lr 1e-3 ...                               # teachers: a smoother curve, a wider spread
    ... --teacher-epochs 15 --stage-epochs 3 10 15 --stage-lr 1e-2 1e-2 3e-3 --baseline-epochs 15 \
        --student-patience 3 --student-schedule none [--scratch-layerwise-student]

For each variant and seed s: both teachers trained with seed s (test accuracy task-aware on their own part,
epochs run, best epoch), then the three stages, the one-stage variant and KD with seed s. Prints per-seed rows
and mean ± sample std per variant, the best epochs of the students (== the last epoch run: still improving),
and the notebook's headline comparison (``kaviz.report.compare``: the fine-tuned student ≈ teacher k on part k
within 0.02, margin in pooled std over the seeds) plus its "below KD" comparison. Teachers are cached under
``$KAVIZ_DATA`` (the cache key covers every setting and the seed).
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

N_IMAGES, IMAGE_SIZE = 3000, 16
TEACHER_ARCH, TEACHER_WIDTH, TEACHER_EPOCHS, LR = "vgg8_small", 8, 10, 3e-3
STUDENT_ARCH, STUDENT_WIDTH = "vgg8_small", 8
STAGE_EPOCHS, STAGE_LR, BASELINE_EPOCHS = (3, 3, 3), (1e-2, 1e-2, 3e-3), 6
ONE_STAGE_LAYERS, BATCH_SIZE, PAR_BAND = [2, 4, 6], 64, 0.02
STUDENTS = {"stage 2": "stage 2: layer-wise (folded)", "stage 3": "stage 3: fine-tuned",
            "one-stage": "one-stage variant", "KD": "KD"}


def settings(variant: str, args) -> dict:
    if variant == "scratch":
        return dict(teacher=dict(epochs=TEACHER_EPOCHS, lr=LR, patience=None, pretrained=False),
                    student_pretrained=False, lw_pretrained=False, stage_epochs=STAGE_EPOCHS,
                    baseline_epochs=BASELINE_EPOCHS, student_patience=None, stage_lr=STAGE_LR, schedule=None)
    if variant == "pretrained":
        return dict(teacher=dict(epochs=args.teacher_epochs, lr=args.teacher_lr, patience=args.patience,
                                 pretrained=True),
                    student_pretrained=True, lw_pretrained=not args.scratch_layerwise_student,
                    stage_epochs=tuple(args.stage_epochs), baseline_epochs=args.baseline_epochs,
                    student_patience=args.student_patience, stage_lr=tuple(args.stage_lr),
                    schedule=args.student_schedule)
    raise ValueError(f"variant must be 'scratch' or 'pretrained', got {variant!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["scratch", "pretrained"])
    ap.add_argument("--teacher-epochs", type=int, default=15, help="pretrained teachers: epochs at most")
    ap.add_argument("--patience", type=int, default=5, help="pretrained teachers: early-stopping patience")
    ap.add_argument("--teacher-lr", type=float, default=LR, help="pretrained teachers' lr (the notebook's: 3e-3)")
    ap.add_argument("--stage-epochs", type=int, nargs=3, default=[3, 8, 15], help="pretrained variant")
    ap.add_argument("--baseline-epochs", type=int, default=12, help="pretrained variant")
    ap.add_argument("--stage-lr", type=float, nargs=3, default=[1e-2, 1e-2, 1e-2], help="pretrained variant")
    ap.add_argument("--student-schedule", default="cosine", help="pretrained variant: the students' lr schedule "
                    "(cosine over each run's epochs; 'none': constant, as the notebook)")
    ap.add_argument("--student-patience", type=int, default=4,
                    help="pretrained variant: students' early-stopping patience (0: none)")
    ap.add_argument("--scratch-layerwise-student", action="store_true",
                    help="pretrained variant: the layer-wise student starts from scratch (KD/one-stage pretrained)")
    ap.add_argument("--out", default="/tmp/helper_layerwise/measure_pretrained_layerwise.csv")
    args = ap.parse_args()

    import kaviz
    from kaviz import data
    from kaviz.methods import kd, layerwise
    from kaviz.models import build
    from kaviz.report import compare
    from kaviz.train import train_teacher

    kaviz.seed_everything(0, threads=1)
    train, val, test = data.split(data.shapes(n=N_IMAGES, size=IMAGE_SIZE), val=0.15, test=0.15, seed=0)
    parts = {name: layerwise.class_parts(ds, 2) for name, ds in [("train", train), ("val", val), ("test", test)]}
    union = {name: data.union(p) for name, p in parts.items()}
    part1, part2 = union["test"].sources
    k = union["train"].num_classes
    example = torch.stack([union["train"].get_image(i) for i in range(4)])
    rows, best = [], []
    for v in args.variants:
        cfg = settings(v, args)
        t_cfg = cfg["teacher"]
        for s in args.seeds:
            t0 = time.perf_counter()
            teachers, row = [], {"variant": v, "seed": s}
            for j, (tr, va) in enumerate(zip(parts["train"], parts["val"]), start=1):
                kw = dict(width=TEACHER_WIDTH, **({"pretrained": True} if t_cfg["pretrained"] else {}))
                model, hist = train_teacher(TEACHER_ARCH, tr, va, epochs=t_cfg["epochs"], lr=t_cfg["lr"],
                                            batch_size=BATCH_SIZE, seed=s, arch_kwargs=kw, device="cpu",
                                            progress=False, patience=t_cfg["patience"])
                teachers.append(model)
                row[f"T{j} epochs"] = len(hist)
                row[f"T{j} best"] = hist.attrs["best_epoch"]
            t_teach = time.perf_counter() - t0

            def student(pretrained, s=s):
                kaviz.seed_everything(s, threads=1)
                return build(STUDENT_ARCH, k, width=STUDENT_WIDTH, **({"pretrained": True} if pretrained else {}))

            sp = cfg["student_patience"]
            extra = {} if not sp else {"patience": sp}
            if cfg["schedule"] not in (None, "none"):
                extra["schedule"] = cfg["schedule"]
            plan = layerwise.plan_layers(teachers, build(STUDENT_ARCH, k, width=STUDENT_WIDTH), example)
            lw_student = student(cfg["lw_pretrained"])
            res = layerwise.run_layerwise(teachers, lw_student, union["train"], union["val"], plan=plan,
                                          epochs=cfg["stage_epochs"], lr=cfg["stage_lr"], batch_size=BATCH_SIZE, seed=s,
                                          device="cpu", progress=False, **extra)
            os_student = student(cfg["student_pretrained"])
            one, one_hist = layerwise.run_one_stage(teachers, os_student, union["train"], union["val"], plan=plan,
                                                    layers=ONE_STAGE_LAYERS, epochs=cfg["baseline_epochs"], lr=LR,
                                                    batch_size=BATCH_SIZE, seed=s, device="cpu", progress=False,
                                                    **extra)
            kd_student = student(cfg["student_pretrained"])
            kd_hist = kd.distill(kd_student, teachers, union["train"], union["val"], epochs=cfg["baseline_epochs"],
                                 lr=LR, batch_size=BATCH_SIZE, seed=s, monitor="val/task_agnostic", device="cpu",
                                 progress=False, **extra)
            tab = layerwise.accuracy_table({STUDENTS["stage 2"]: res.students["layer-wise"],
                                            STUDENTS["stage 3"]: res.students["fine-tuned"],
                                            STUDENTS["one-stage"]: one.student, STUDENTS["KD"]: kd_student},
                                           union["test"], teachers=teachers, device="cpu").set_index("model")
            row["T1 part1"] = float(tab.loc["teacher 1", part1])
            row["T2 part2"] = float(tab.loc["teacher 2", part2])
            row["teachers all"] = float(tab.loc["concatenated teachers", "task-aware (all)"])
            row["teachers whole"] = float(tab.loc["concatenated teachers", "whole"])
            for short, name in STUDENTS.items():
                row[f"{short} part1"] = float(tab.loc[name, part1])
                row[f"{short} part2"] = float(tab.loc[name, part2])
                row[f"{short} all"] = float(tab.loc[name, "task-aware (all)"])
                row[f"{short} whole"] = float(tab.loc[name, "whole"])
            hists = {"stage 2": res.histories["stage 2: layer-wise"], "stage 3": res.histories["stage 3: fine-tuning"],
                     "one-stage": one_hist, "KD": kd_hist}
            for name, h in hists.items():
                best.append({"variant": v, "seed": s, "student": name, "best epoch": h.attrs["best_epoch"],
                             "epochs run": len(h), "still improving": h.attrs["best_epoch"] == len(h),
                             "val agnostic per epoch": " ".join(f"{x:.3f}" for x in h["val/task_agnostic"])})
            row["teacher s"], row["total s"] = round(t_teach), round(time.perf_counter() - t0)
            rows.append(row)
            print(row, flush=True)

    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    acc_cols = [c for c in df.columns if c.split()[-1] in ("part1", "part2", "all", "whole")]
    ep_cols = [c for c in df.columns if c.endswith(("epochs", "best"))]
    with pd.option_context("display.width", 250, "display.max_columns", 60, "display.max_colwidth", 80):
        print("\nper seed (test split; teachers task-aware on their own part):")
        print(df.set_index(["variant", "seed"])[acc_cols].round(3).T.to_string())
        print(df.set_index(["variant", "seed"])[ep_cols + ["teacher s", "total s"]].T.to_string())
        g = df.drop(columns=["seed"]).groupby("variant", sort=False)
        summary = g.mean().round(3).astype(str) + " ± " + g.std(ddof=1).round(3).astype(str)
        print("\nmean ± sample std (ddof=1) over seeds", args.seeds)
        print(summary[acc_cols].T.to_string())
        print(summary[ep_cols].T.to_string())
        print("\nteacher spread over seeds (max - min):")
        print(g[["T1 part1", "T2 part2"]].agg(lambda x: x.max() - x.min()).round(3).to_string())
        print("\nstudents' best epochs (best == last run: still improving):")
        print(pd.DataFrame(best).to_string(index=False))
        print("\nheadline (notebook's claims cell): stage 3 ≈ teacher k on part k within", PAR_BAND)
        for v, d in df.groupby("variant", sort=False):
            for j, p in ((1, "part1"), (2, "part2")):
                c = compare(f"fine-tuned ≈ teacher {j} on part {j}", d[f"stage 3 {p}"].tolist(),
                            d[f"T{j} {p}"].tolist(), relation="≈", band=PAR_BAND, a_name="stage 3",
                            b_name=f"teacher {j}")
                print(f"  {v}: {c.sentence()}  [margin {c.margin_std:+.1f} std, {c.verdict}]")
            for other in ("KD", "one-stage"):
                c = compare(f"fine-tuned below {other}", d["stage 3 all"].tolist(), d[f"{other} all"].tolist(),
                            relation="<", a_name="stage 3", b_name=other)
                print(f"  {v}: {c.sentence()}  [margin {c.margin_std:+.1f} std, {c.verdict}]")
            c = compare("KD ≈ teachers (task-aware all)", d["KD all"].tolist(), d["teachers all"].tolist(),
                        relation="≈", band=PAR_BAND, a_name="KD", b_name="teachers")
            print(f"  {v}: {c.sentence()}  [margin {c.margin_std:+.1f} std, {c.verdict}]")


if __name__ == "__main__":
    main()
