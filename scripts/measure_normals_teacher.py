"""Normals teacher vs constant normal on the embedded SBM scenes (notebook defaults), 1 thread, 3 seeds.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_normals_teacher.py   # ~2 min on 1 core
"""
import time

import numpy as np
import pandas as pd
import torch

from kaviz.methods import sbm

torch.set_num_threads(1)
t0 = time.time()
(train, val, test), info = sbm.scene_splits("embedded", image_size=32, n=1000, max_objects=1, seed=0, normals=True)
TASK = {"normals": "normals"}
EPOCHS = 3  # the notebook trains its teachers 8 epochs; 3 keeps three seeds within ~5 min on a shared CPU
rows = {}
const = sbm.constant_predictor(train, TASK, info["num_classes"])
rows["constant (mean training normal)"] = sbm.score(const, test, kinds=TASK, prefix=False)
for seed in (0, 1, 2):
    teachers, hist = sbm.train_teachers(train, val, num_classes=info["num_classes"], epochs=EPOCHS, widths=(16, 32, 64),
                                        lr=5e-3, batch_size=16, seed=seed, tasks=TASK, cache=False, progress=False)
    rows[f"teacher seed {seed}"] = sbm.score(teachers, test, kinds=TASK, prefix=False)
    print(rows[f"teacher seed {seed}"])
    print(seed, "best epoch", hist["normals"].attrs.get("best_epoch"), f"{time.time() - t0:.0f}s", flush=True)
df = pd.DataFrame(rows).T
teach = df.filter(like="teacher", axis=0)
df.loc["teacher mean"] = teach.mean()
df.loc["teacher sample std"] = teach.std(ddof=1)
pd.set_option("display.width", 200)
print("constant normal:", np.round(const.mean_normal, 4))
print(df.round(4).to_string())
print(f"total {time.time() - t0:.0f}s")
