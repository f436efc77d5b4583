"""Execute notebooks headless (nbclient) and report one line per notebook.

    python scripts/run_notebooks.py --out reports notebooks/*.ipynb   # executed copies + HTML in reports/
    python scripts/run_notebooks.py --inplace notebooks/x.ipynb       # store fresh outputs (developers)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run(path: Path, out: Path | None, inplace: bool, timeout: int) -> tuple[bool, float, str]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    # Widget state makes the HTML reports interactive, but every plotly FigureWidget stores a copy of
    # plotly.js (~5 MB): keep it out of the notebooks committed to the repository.
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            store_widget_state=not inplace)
    t0 = time.perf_counter()
    ok, note = True, ""
    try:
        client.execute()
    except CellExecutionError as exc:
        ok = False
        lines = [l for l in str(exc).splitlines() if l.strip()]
        note = lines[-1][:200] if lines else "cell failed"
    seconds = time.perf_counter() - t0
    if inplace and ok:
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / path.name)
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        (out / path.with_suffix(".html").name).write_text(body, encoding="utf-8")
    return ok, seconds, note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="folder for executed copies and HTML reports")
    p.add_argument("--inplace", action="store_true", help="write outputs back into the notebooks")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    failed = 0
    for path in args.notebooks:
        ok, seconds, note = run(path, args.out, args.inplace, args.timeout)
        failed += not ok
        status = "ok  " if ok else "FAIL"
        where = f" -> {args.out / path.with_suffix('.html').name}" if args.out else ""
        print(f"{status} {path.name:45s} {seconds:7.1f} s{where}{'  ' + note if note else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
