"""Run a notebook headless with parameters: ``python -m kaviz run NOTEBOOK -p NAME=VALUE ... --out DIR``.

Papermill-style: the cell tagged ``parameters`` is kept, and a cell tagged ``injected-parameters`` with
Papermill-style injection into the cell tagged ``parameters``: each ``NAME = value`` is inserted right
after the statement of that cell that sets NAME (so parameters derived from it further down, like
``EPOCHS = 6 if QUICK else 20``, follow), and the cell is tagged ``injected-parameters``: the executed
notebook shows both the defaults and what this run changed. Values are parsed as Python literals (``3``, ``True``,
``None``,
``[0, 1, 2]``, ``{"a": 1}``), anything else is taken as a string (``-p CUB_ROOT=/data/CUB_200_2011``).
Only names the parameter cell defines can be set (a typo is an error with the closest names).

``--dry-run`` executes nothing but the parameter cells (in this process, no kernel) and prints the resolved
parameters and the plan: the datasets and folders it will read (and whether they exist), the networks,
epochs and seeds it names, and the device it would use.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import sys
import time
from pathlib import Path

__all__ = ["parse_assignments", "inject_parameters", "resolve_parameters", "plan", "execute", "claims_command",
           "zoo_command", "main"]

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


class ParameterError(ValueError):
    """A -p assignment the notebook cannot take (malformed, or a name its parameter cell does not define)."""


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items) -> dict:
    """``["EPOCHS=3", "DATA=cub_dogs"]`` → ``{"EPOCHS": 3, "DATA": "cub_dogs"}``."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ParameterError(f"-p {item!r}: expected NAME=VALUE with a Python name, e.g. -p EPOCHS=3")
        out[name] = _literal(value.strip())
    return out


def _read(path):
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}; the notebooks are in notebooks/*.ipynb")
    return nbformat.read(path, as_version=4)


def _parameter_cell(nb, path="notebook"):
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return i
    raise ParameterError(f"{path} has no cell tagged '{PARAMETERS_TAG}': tag the cell that sets the notebook's "
                         "parameters (JupyterLab: property inspector → cell tags) to run it with -p")


def _defaults(source: str) -> dict:
    ns: dict = {}
    exec(compile(source, "<parameters>", "exec"), ns)  # the notebook's own parameter cell: plain assignments
    return {k: v for k, v in ns.items() if not k.startswith("_") and k.isupper()}


def _assigned_names(stmt) -> set[str]:
    import ast as _ast

    names = set()
    targets = []
    if isinstance(stmt, _ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (_ast.AnnAssign, _ast.AugAssign)):
        targets = [stmt.target]
    for t in targets:
        for node in _ast.walk(t):
            if isinstance(node, _ast.Name):
                names.add(node.id)
    return names


def _with_injections(source: str, params: dict) -> str:
    """The parameter cell with ``NAME = value`` inserted right after every top-level statement that sets
    NAME, so the lines after it that derive other parameters (``EPOCHS = 6 if QUICK else 20``) see the
    injected value."""
    tree = ast.parse(source)
    lines = source.splitlines()
    inserts: dict[int, list[str]] = {}
    for stmt in tree.body:
        hit = [k for k in params if k in _assigned_names(stmt)]
        if hit:
            indent = " " * stmt.col_offset
            inserts.setdefault(stmt.end_lineno, []).extend(
                f"{indent}{k} = {params[k]!r}  # set by `python -m kaviz run -p`" for k in hit)
    out = []
    for n, line in enumerate(lines, start=1):
        out.append(line)
        out.extend(inserts.get(n, []))
    return "\n".join(out)


def inject_parameters(nb, params: dict, path="notebook"):
    """Set ``params`` in the notebook's parameter cell (papermill-style, but in place: each injected
    assignment follows the statement it overrides, and the cell is tagged ``injected-parameters``)."""
    i = _parameter_cell(nb, path)
    cell = nb.cells[i]
    defaults = _defaults(cell.source)
    unknown = [k for k in params if k not in defaults]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(defaults), n=3) for k in unknown}
        raise ParameterError(f"{path} has no parameter(s) {unknown}"
                             + "".join(f"; {k}: did you mean {h}?" for k, h in hints.items() if h)
                             + f". Its parameters: {sorted(defaults)}")
    if params:
        cell.source = _with_injections(cell.source, params)
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if INJECTED_TAG not in tags:
            tags.append(INJECTED_TAG)
    return nb


def resolve_parameters(nb, params: dict | None = None, path="notebook") -> dict:
    """The parameter cell's values with ``params`` injected (derived parameters recomputed)."""
    i = _parameter_cell(nb, path)
    source = nb.cells[i].source
    return _defaults(_with_injections(source, params) if params else source)


def plan(values: dict) -> list[str]:
    """What a run with these parameters will do, in words."""
    import torch

    lines = []
    data = values.get("DATA")
    if data is not None:
        lines.append(f"data: {data!r}")
    for name, value in values.items():
        if (name.endswith("_ROOT") or name.endswith("_DIR")) and value:
            p = Path(str(value)).expanduser()
            lines.append(f"  {name} = {value}: {'found' if p.exists() else 'NOT FOUND — the run will stop there'}")
        elif name.endswith("_ROOT") and data not in (None, "embedded", "shapes", "digits"):
            lines.append(f"  {name} = None (needed for DATA={data!r}?)")
    for key in ("TEACHERS", "TEACHER", "STUDENTS", "STUDENT", "ARCHS", "SOURCES"):
        if key in values:
            v = values[key]
            lines.append(f"networks ({key}): {list(v) if isinstance(v, dict) else v}")
    for key in sorted(values):
        if "EPOCH" in key or key in ("SEEDS", "QUICK", "SMOKE", "BATCH", "BATCH_SIZE", "IMAGE_SIZE"):
            lines.append(f"{key} = {values[key]!r}")
    device = values.get("DEVICE", "auto")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lines.append(f"device: {device}" + ("" if device != "cpu" or not torch.cuda.is_available() else " (a GPU is "
                                        "available)"))
    return lines


def execute(path, params: dict | None = None, out=None, inplace: bool = False, timeout: int = 3600,
            html: bool = True, store_widget_state: bool | None = None) -> tuple[bool, float, str]:
    """Execute a notebook (with injected parameters) and write the executed copy and its HTML report to
    ``out`` (or back in place). Returns (ok, seconds, note of the failing cell)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = _read(path)
    if params:
        inject_parameters(nb, params, path)
    # Widget state makes HTML reports interactive, but every plotly FigureWidget stores a copy of
    # plotly.js (~5 MB): keep it out of notebooks committed to the repository.
    keep_state = (not inplace) if store_widget_state is None else store_widget_state
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}}, store_widget_state=keep_state)
    t0 = time.perf_counter()
    ok, note = True, ""
    try:
        client.execute()
    except CellExecutionError as exc:
        ok = False
        lines = [line for line in str(exc).splitlines() if line.strip()]
        note = lines[-1][:300] if lines else "cell failed"
    seconds = time.perf_counter() - t0
    if inplace and ok:
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / path.name)
        if html:
            from nbconvert import HTMLExporter

            body, _ = HTMLExporter().from_notebook_node(nb)
            (out / path.with_suffix(".html").name).write_text(body, encoding="utf-8")
    return ok, seconds, note


def claims_command(notebooks, headline_only: bool = False, as_json: bool = False, file=None) -> int:
    """``python -m kaviz claims``: print the claims of executed notebooks. Returns 2 when a file is missing or
    is not a notebook, 1 when none of them printed claims, else 0 (a notebook without claims, such as
    getting_started, is named on stderr)."""
    import json

    from .report import read_claims

    file = file or sys.stdout
    rows, missing = [], []
    for path in notebooks:
        path = Path(path)
        if not path.is_file():
            print(f"error: {path}: no such notebook", file=sys.stderr)
            return 2
        try:
            found = read_claims(path)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not found:
            missing.append(path.name)
        rows += found
    shown = [r for r in rows if r.get("headline")] if headline_only else rows
    if as_json:
        print(json.dumps(shown, ensure_ascii=False), file=file)
    else:
        for r in shown:
            m = r.get("margin_std")
            margin = "n/a" if m is None else (f"{m:+.1f}" if abs(m) < 1e8 else ("+inf" if m > 0 else "-inf"))
            print(f"{r['notebook'][:34]:34s} {'H' if r.get('headline') else ' '} {r['verdict']:15s} {margin:>7s}  "
                  f"{r['claim']}", file=file)
        by_nb = {}
        for r in rows:
            if r.get("headline"):
                by_nb.setdefault(r["notebook"], []).append(r["verdict"] == "reproduced")
        held = sum(all(v) for v in by_nb.values())
        print(f"headline claims reproduced in {held} of {len(by_nb)} notebooks (H: headline; margin in std)", file=file)
    for name in missing:
        print(f"note: {name} printed no CLAIMS line (not a paper notebook, not executed, or it stopped before "
              "its claims cell)", file=sys.stderr)
    return 0 if rows else 1


def zoo_command(zoo_dir=None, file=None) -> int:
    """``python -m kaviz zoo``: print the zoo's entries (1 when there are none)."""
    import pandas as pd

    from .models.zoo import entries

    table = entries(zoo_dir)
    if table.empty:
        print(f"no zoo entries in {zoo_dir or 'the shipped zoo'}; build some with scripts/build_zoo.py",
              file=sys.stderr)
        return 1
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False), file=file)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kaviz", description="kaviz command line")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="execute notebooks headless with parameters", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("notebooks", nargs="+", type=Path)
    r.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set a parameter of the notebook's parameter cell (repeatable)")
    r.add_argument("--out", type=Path, default=None, help="folder for the executed notebook and its HTML report")
    r.add_argument("--inplace", action="store_true", help="store the outputs in the notebook itself (developers)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved parameters and the plan; run nothing")
    r.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    c = sub.add_parser("claims", help="the claims tables executed notebooks printed (their CLAIMS lines)",
                       description="Read the CLAIMS line(s) of executed notebooks (stored outputs, or the copies "
                                   "`run --out` wrote) and print one row per claim; the last line counts the "
                                   "notebooks whose headline claims are all reproduced.")
    c.add_argument("notebooks", nargs="+", type=Path)
    c.add_argument("--headline", action="store_true", help="only the papers' headline claims")
    c.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    z = sub.add_parser("zoo", help="the pretrained backbones kaviz ships (kaviz.models.zoo)",
                       description="One row per zoo entry: architecture and arguments, what it was pretrained on, "
                                   "its validation accuracy, best epoch, epochs run, build time and size, read from "
                                   "the manifest (or --dir's).")
    z.add_argument("--dir", type=Path, default=None, help="a zoo folder of your own (scripts/build_zoo.py --out)")
    args = p.parse_args(argv)
    if args.command == "zoo":
        return zoo_command(args.dir)
    if args.command == "claims":
        return claims_command(args.notebooks, headline_only=args.headline, as_json=args.json)
    try:
        params = parse_assignments(args.param)
        if args.inplace and params:
            raise ParameterError("--inplace with -p would store a parameterised run as the notebook; use --out")
        if not args.dry_run and args.out is None and not args.inplace:
            args.out = Path("reports")
        failed = 0
        for path in args.notebooks:
            nb = _read(path)
            inject_parameters(nb, params, path)  # validates names before anything runs
            if args.dry_run:
                values = resolve_parameters(_read(path), params, path)
                print(f"# {path}")
                for k, v in values.items():
                    mark = "  (set by -p)" if k in params else ""
                    print(f"{k} = {v!r}{mark}")
                print("plan:")
                print("\n".join("  " + line for line in plan(values)))
                continue
            ok, seconds, note = execute(path, params, out=args.out, inplace=args.inplace, timeout=args.timeout)
            failed += not ok
            where = f" -> {args.out / path.with_suffix('.html').name}" if args.out else ""
            print(f"{'ok  ' if ok else 'FAIL'} {path.name:45s} {seconds:7.1f} s{where}{'  ' + note if note else ''}",
                  flush=True)
        return 1 if failed else 0
    except (ParameterError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
