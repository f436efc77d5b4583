"""How much signal the LSH term carries at a given hyperplane scale (issue 15; docs/decisions.md, "Recipes").

Trains (or loads from the cache) the LSHFM notebook's embedded teacher with the notebook's recipe, then for
several ``std`` values prints the LSH term of a student that mimics the teacher exactly and of one paired
with other images' teacher features (shuffled pairs): the gap between the two is what the term can teach.
Run: ``KAVIZ_DATA=/tmp/somewhere python scripts/measure_lsh_scale.py`` (one thread, ~2 min on a CPU).
"""
import math

import torch

import kaviz
from kaviz.methods import lshfm
from kaviz.train import train_teacher


def main():
    kaviz.seed_everything(0, threads=1)
    train, val, _ = lshfm.load_data("embedded", n=2500, image_size=32, max_objects=2, seed=0)
    teacher, _ = train_teacher("vgg8_small", train, val, num_classes=len(train.classes), epochs=8, lr=2e-3,
                               batch_size=32, optimizer="adam", schedule="cosine", weight_decay=5e-4, loss="bce",
                               target_key="labels", arch_kwargs={"width": 16}, progress=False)
    f_tr = lshfm.TeacherOutputs(train, teacher).features
    f_va = lshfm.TeacherOutputs(val, teacher).features
    perm = torch.randperm(len(f_va), generator=torch.Generator().manual_seed(0))
    c = lshfm.classifier_std(teacher)
    print(f"ln 2 = {math.log(2):.4f}; teacher feature dim {f_tr.shape[1]}")
    for name, std in [("classifier std (SPEC default)", c), ("hash_std (unit logit std)", lshfm.hash_std(f_tr)),
                      ("10 x classifier std", 10 * c)]:
        lsh = lshfm.LSHLoss(f_tr.shape[1], 4 * f_tr.shape[1], std, seed=0, with_l2=False).fit_bias(f_tr)
        perfect = lsh(f_va, f_va)["lsh"].item()
        shuffled = lsh(f_va[perm], f_va)["lsh"].item()
        print(f"{name:30s} std {std:.4f}  teacher logit std {lsh.hash(f_va).std().item():.3f}  "
              f"LSH term: perfect mimic {perfect:.4f}, shuffled pairs {shuffled:.4f}, gap {shuffled - perfect:.4f}")


if __name__ == "__main__":
    main()
