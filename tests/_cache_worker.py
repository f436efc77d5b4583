"""Subprocess for tests/test_faults_cache.py: waits for a start file, then asks train_teacher for one
teacher in a shared cache folder and prints ``{"cached": ..., "hash": ...}`` as JSON."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TinyImages  # noqa: E402

from kaviz import models  # noqa: E402
from kaviz.train import train_teacher  # noqa: E402


def main(cache, go):
    torch.set_num_threads(1)
    train, val = TinyImages(n=192), TinyImages(n=30, seed=1)
    print("ready", flush=True)
    deadline = time.time() + 60
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.005)
    model, hist = train_teacher("vgg8_small", train, val, epochs=3, batch_size=16, cache=cache,
                                arch_kwargs={"width": 4}, progress=False)
    print(json.dumps({"cached": bool(hist.attrs["cached"]), "hash": models.weights_hash(model)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
