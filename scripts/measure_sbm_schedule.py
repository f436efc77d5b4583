"""SBM block phase: the joint schedule (default) vs the blockwise one, on the SBM notebook's embedded
setting (notebooks/student_becoming_the_master.ipynb parameter cell), 1 thread, seeds 0 1 2.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_sbm_schedule.py

Prints one row per (schedule, seed) and mean ± sample std per schedule of the test-split scores, the
branch points chosen and the seconds per run. The teachers are trained once (seed 0), as in the notebook.
"""
import time

import pandas as pd

import kaviz
from kaviz.methods import sbm

N_SCENES, IMAGE_SIZE, MAX_OBJECTS, WIDTHS = 1000, 32, 1, (16, 32, 64)
TEACHER_EPOCHS, TEACHER_LR, TEACHER_BATCH = 8, 5e-3, 16
CANDIDATES = ["enc3", "dec3", "dec2", "dec1"]
SEARCH_EPOCHS, FINETUNE_EPOCHS, LR, FINETUNE_LR, BATCH_SIZE = 2, 2, 1e-3, 3e-4, 32
SEEDS = [0, 1, 2]
KINDS = {"seg": "segmentation", "depth": "depth"}


def main():
    kaviz.seed_everything(SEEDS[0], threads=1)
    (train, val, test), info = sbm.scene_splits("embedded", image_size=IMAGE_SIZE, n=N_SCENES, max_objects=MAX_OBJECTS,
                                                seed=SEEDS[0])
    teachers, _ = sbm.train_teachers(train, val, num_classes=info["num_classes"], epochs=TEACHER_EPOCHS, widths=WIDTHS,
                                     lr=TEACHER_LR, batch_size=TEACHER_BATCH, seed=SEEDS[0], cache=False,
                                     progress=False)
    rows = []
    for schedule in ("joint", "blockwise"):
        for seed in SEEDS:
            t0 = time.process_time()
            res = sbm.run(teachers, train, val, points={t: CANDIDATES for t in KINDS}, seg_loss="ce",
                          search_epochs=SEARCH_EPOCHS, finetune_epochs=FINETUNE_EPOCHS, lr=LR, finetune_lr=FINETUNE_LR,
                          batch_size=BATCH_SIZE, seed=seed, schedule=schedule, progress=False)
            cpu = time.process_time() - t0
            s = sbm.score(res.student, test, kinds=KINDS)
            rows.append({"schedule": schedule, "seed": seed, "seg point": res.points["seg"],
                         "depth point": res.points["depth"], **s, "cpu s": cpu})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(df.to_string(index=False))
    num = df.drop(columns=["seed", "seg point", "depth point"])
    print(num.groupby("schedule", sort=False).agg(["mean", "std"]).T.to_string())  # std: sample (ddof=1)


if __name__ == "__main__":
    main()
