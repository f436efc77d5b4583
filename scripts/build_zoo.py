"""Build (or rebuild) the zoo of pretrained backbones shipped in kaviz/models/pretrained/.

    make zoo                                    # every entry below, in the pinned environment
    .venv/bin/python scripts/build_zoo.py --arch cifar_resnet8 --kwargs '{"width": 8}'
    .venv/bin/python scripts/build_zoo.py --only vgg8_small-width=4 --out /tmp/myzoo

Each entry trains one of kaviz's small architectures on the synthetic pretraining world by
kaviz.pretrain.default_recipe(arch) (one thread; run it in make's pinned floating-point
environment so the bits match the manifest) until its validation accuracy stops improving, then
writes ``<entry>.pt`` and its manifest row (SHA-256, recipe, result, wall time, floating-point path).
The default list (ENTRIES) is exactly what ships: the smallest member of each family with its default
arguments, cifar_resnet14, and the variants the notebooks use.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from kaviz import pretrain
from kaviz.models import zoo

#: (architecture, arguments): the smallest members of each family with their defaults (and cifar_resnet14), then
#: the notebooks' variants. The deeper ones (cifar_resnet20/32, vgg11_small) are not shipped: --arch builds them.
ENTRIES = [
    ("cifar_resnet8", {}), ("cifar_resnet14", {}),
    ("vgg8_small", {}), ("mobilenet_small", {}), ("segnet_small", {}),
    ("cifar_resnet8", {"width": 8}), ("cifar_resnet8", {"width": 12}),
    ("vgg8_small", {"width": 4}), ("vgg8_small", {"width": 8}),
    ("mobilenet_small", {"width": 8, "head_width": 32}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", help="build one entry of this architecture (with --kwargs)")
    ap.add_argument("--kwargs", default="{}", help="its arguments as JSON, e.g. '{\"width\": 8}'")
    ap.add_argument("--only", nargs="*", default=None, help="entry names from the default list to build")
    ap.add_argument("--out", default=str(zoo.ZOO_DIR), help="zoo folder (default: the shipped one)")
    ap.add_argument("--list", action="store_true", help="print the default entry names and exit")
    args = ap.parse_args(argv)
    if args.arch:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            ap.error(f"--kwargs is not JSON: {e}")
        if not isinstance(kwargs, dict):
            ap.error("--kwargs must be a JSON object")
        todo = [(args.arch, kwargs)]
    else:
        todo = list(ENTRIES)
    names = {zoo.entry_name(a, k): (a, k) for a, k in todo}
    if args.list:
        print("\n".join(names))
        return 0
    if args.only is not None:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"unknown entries {unknown}; --list prints the default names")
        names = {n: names[n] for n in args.only}
    t0 = time.perf_counter()
    for name, (arch, kwargs) in names.items():
        e = pretrain.build_entry(arch, kwargs, out_dir=args.out)
        r = e["result"]
        print(f"{name}: {r['monitor']} {r['val_accuracy']:.4f} at epoch {r['best_epoch']} of {r['epochs_run']} "
              f"({r['seconds']:.0f} s, {e['bytes'] / 1024:.0f} kB, sha256 {e['sha256'][:12]})", flush=True)
    print(f"built {len(names)} entries in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
