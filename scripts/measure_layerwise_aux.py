"""Where stage 2's auxiliary map sits, and what it does to layer-wise amalgamation (issue 15; docs/decisions.md,
"Recipes", row "Layer-wise · auxiliary map").

The setting of notebooks/layerwise_amalgamation.ipynb's embedded default (3000 synthetic 16×16 shapes, 10 classes
cut into two parts of 5, vgg8_small teachers of width 8 trained 10 epochs, a vgg8_small student of width 8,
stages (3, 3, 3) epochs at lr (1e-2, 1e-2, 3e-3), batch 64), at one thread, for three variants:

- (a) ``output`` + BN: kaviz's default (A right after the layer's own conv, before its batch-norm);
- (b) ``input`` + BN-free: the paper's placement (A on the next layer's pre-activation input, before its
  ReLU/pooling, folded backwards) with the BN-free student ``vgg8_small(norm=False)``;
- (c) ``output`` + BN-free: the default placement on the BN-free student (separates the two changes).

Prints test accuracy after stage 2 (folded) and stage 3 (fine-tuned), task-aware (all) and whole (task-agnostic),
mean ± sample std over the seeds, per-seed values, and the wall time.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_layerwise_aux.py [--seeds 0 1 2]`` (teachers are
trained without the cache, so nothing is written; about 4–6 min on one CPU core).
"""
import argparse
import time

import pandas as pd
import torch

import kaviz
from kaviz import data
from kaviz.methods import layerwise
from kaviz.models import build
from kaviz.train import train_teacher

N_IMAGES, IMAGE_SIZE = 3000, 16
TEACHER_ARCH, TEACHER_WIDTH, TEACHER_EPOCHS = "vgg8_small", 8, 10
STUDENT_ARCH, STUDENT_WIDTH = "vgg8_small", 8
STAGE_EPOCHS, STAGE_LR, LR, BATCH_SIZE = (3, 3, 3), (1e-2, 1e-2, 3e-3), 3e-3, 64
VARIANTS = {  # name: (placement, student keyword arguments)
    "(a) output, BN (default)": ("output", {}),
    "(b) input, BN-free (paper)": ("input", {"norm": False}),
    "(c) output, BN-free": ("output", {"norm": False}),
}
STAGES = {"stage 2": "layer-wise", "stage 3": "fine-tuned"}


def main(seeds):
    t0 = time.perf_counter()
    kaviz.seed_everything(seeds[0], threads=1)
    train, val, test = data.split(data.shapes(n=N_IMAGES, size=IMAGE_SIZE), val=0.15, test=0.15, seed=0)
    parts = {name: layerwise.class_parts(ds, 2) for name, ds in [("train", train), ("val", val), ("test", test)]}
    union = {name: data.union(p) for name, p in parts.items()}
    teachers = [train_teacher(TEACHER_ARCH, tr, va, epochs=TEACHER_EPOCHS, lr=LR, batch_size=BATCH_SIZE, seed=0,
                              arch_kwargs=dict(width=TEACHER_WIDTH), device="cpu", cache=False, progress=False)[0]
                for tr, va in zip(parts["train"], parts["val"])]
    t_teachers = time.perf_counter() - t0
    print(f"teachers trained: {t_teachers:.0f} s", flush=True)
    example = torch.stack([union["train"].get_image(i) for i in range(4)])
    k = union["train"].num_classes
    rows, fold, times = [], {}, {}
    for name, (placement, kw) in VARIANTS.items():
        plan = layerwise.plan_layers(teachers, build(STUDENT_ARCH, k, width=STUDENT_WIDTH, **kw), example)
        t1 = time.perf_counter()
        for seed in seeds:
            kaviz.seed_everything(seed, threads=1)
            res = layerwise.run_layerwise(
                teachers, build(STUDENT_ARCH, k, width=STUDENT_WIDTH, **kw), union["train"], union["val"], plan=plan,
                epochs=STAGE_EPOCHS, lr=STAGE_LR, batch_size=BATCH_SIZE, seed=seed, device="cpu", progress=False,
                placement=placement)
            x = torch.stack([union["test"].get_image(i) for i in range(64)])
            check = layerwise.fold_check(res.layerwise, x)
            fold[(name, seed)] = max(v for key, v in check.items() if key.startswith("max_rel"))
            tab = layerwise.accuracy_table({stage: res.students[s] for stage, s in STAGES.items()}, union["test"],
                                           device="cpu").set_index("model")
            for stage in STAGES:
                rows.append({"variant": name, "stage": stage, "seed": seed,
                             "task-aware (all)": tab.loc[stage, "task-aware (all)"], "whole": tab.loc[stage, "whole"]})
                print(f"{name}, seed {seed}, {stage}: task-aware {rows[-1]['task-aware (all)']:.3f}, whole "
                      f"{rows[-1]['whole']:.3f} ({time.perf_counter() - t0:.0f} s, {time.process_time():.0f} s CPU)",
                      flush=True)
        times[name] = time.perf_counter() - t1
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 160)
    print(f"teachers: {t_teachers:.0f} s; seeds {seeds}; test split, {len(union['test'])} images\n")
    print("per seed:")
    print(df.pivot_table(index=["variant", "stage"], columns="seed", values=["task-aware (all)", "whole"])
          .round(3).to_string())
    print(f"\nmean ± sample std over {len(seeds)} seeds:")
    g = df.groupby(["variant", "stage"], sort=False)[["task-aware (all)", "whole"]]
    mean, std = g.mean(), g.std(ddof=1)
    print(pd.DataFrame({c: [f"{m:.3f} ± {sd:.3f}" for m, sd in zip(mean[c], std[c])] for c in mean.columns},
                       index=mean.index).to_string())
    print("\nlargest relative fold difference (eval/train):",
          {n: f"{max(v for (m, _), v in fold.items() if m == n):.1e}" for n in VARIANTS})
    print("wall time per variant (all seeds, three stages):", {n: f"{t:.0f} s" for n, t in times.items()})
    print(f"total wall time: {time.perf_counter() - t0:.0f} s, CPU time {time.process_time():.0f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    main(ap.parse_args().seeds)
