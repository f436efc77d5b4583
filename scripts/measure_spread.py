"""Measure how far a notebook's expectations move across floating-point paths, and suggest bands.

    python scripts/measure_spread.py notebooks/x.ipynb [more.ipynb] [--paths avx2:2 avx512:2 avx2:1 native:2]

Each notebook is executed once per path (``ISA:THREADS``: ``ATEN_CPU_CAPABILITY`` / oneDNN / MKL set to
that instruction set, or nothing pinned for ``native``, ``KAVIZ_THREADS`` overriding the notebook's thread
count) with an empty cache of its
own and ``KAVIZ_EXPECT=record``, so every ``kaviz.expect`` / ``kaviz.report.compare`` call logs its value
instead of raising. The table printed at the end gives, per expectation, the value on each path, the
largest deviation from the first path (the one the stored outputs are made under, as ``make`` pins it)
and the suggested band: twice that deviation, never below ``--floor``; for verdicts, the set of verdicts
seen. docs/regression.md says how bands are chosen from it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ISA = {  # ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx512": ("avx512", "AVX512_CORE", "AVX512"),
    "default": ("default", "SSE41", "COMPATIBLE"),
    # nothing pinned: the path a user's `jupyter lab` takes (torch's own choice, oneDNN's, and MKL without
    # conditional numerical reproducibility, which MKL_CBWR=AUTO would switch on)
    "native": None,
}
FP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def path_env(spec: str) -> dict:
    isa, _, threads = spec.partition(":")
    if isa not in ISA:
        raise SystemExit(f"unknown instruction set {isa!r} in {spec!r}; use one of {sorted(ISA)}")
    env = {} if ISA[isa] is None else dict(zip(FP_VARS, ISA[isa]))
    if threads:
        env["KAVIZ_THREADS"] = threads
    return env


def run(notebook: Path, spec: str, workdir: Path) -> list[dict]:
    log = workdir / f"{notebook.stem}.{spec.replace(':', '_')}.jsonl"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in FP_VARS}  # "native" leaves them unset
    env = {**base, **path_env(spec), "CI": "1", "KAVIZ_EXPECT": "record", "KAVIZ_EXPECT_LOG": str(log),
           "KAVIZ_DATA": str(workdir / f"cache-{spec.replace(':', '_')}")}
    out = workdir / spec.replace(":", "_")
    cmd = [sys.executable, str(Path(__file__).with_name("run_notebooks.py")), "--out", str(out), str(notebook)]
    print(f"[{spec}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=False)
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--paths", nargs="+", default=["avx2:2", "avx512:2", "avx2:1", "native:2"])
    p.add_argument("--workdir", type=Path, default=None, help="logs, executed copies and caches (default: a temp dir)")
    p.add_argument("--floor", type=float, default=0.005, help="smallest band suggested")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kaviz-spread-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for nb in args.notebooks:
        values: dict[tuple[str, str], dict[str, object]] = defaultdict(dict)
        stored: dict[tuple[str, str], dict] = {}
        for spec in args.paths:
            for row in run(nb, spec, workdir):
                key = (row["kind"], row["name"])
                values[key][spec] = row["verdict"] if row["kind"] == "verdict" else row["value"]
                stored.setdefault(key, row)
        print(f"\n## {nb.name}  (paths: {', '.join(args.paths)}; logs in {workdir})")
        for (kind, name), by_path in values.items():
            row = stored[(kind, name)]
            seen = [by_path.get(s) for s in args.paths]
            if kind == "verdict":
                print(f"verdict  {name}: {seen}  -> expect {sorted(set(v for v in seen if v))}")
                continue
            nums = [v for v in seen if isinstance(v, (int, float))]
            first = seen[0] if isinstance(seen[0], (int, float)) else (nums[0] if nums else float("nan"))
            dev = max((abs(v - first) for v in nums), default=float("nan"))
            band = max(2 * dev, args.floor)
            current = f"stored {row['stored']} ± {row['tol']}" if row.get("stored") is not None else "bounds"
            print(f"expect   {name}: " + ", ".join(f"{v:.4f}" if isinstance(v, (int, float)) else "—" for v in seen)
                  + f"  max dev {dev:.4f} -> band {band:.3g} (now {current})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
