"""getting_started and common_feature_learning in a real JupyterLab, in headless chromium (issue 18).

Runs each notebook with Run All (its stored parameters; the teachers come from the cache that nbval
filled), then checks what a reader sees and does: no error
output, every figure inside the output area at 1600×1000 with the file browser open, no request to a
CDN, no "share chart" button; the explorer's dropdowns, hover → image, 20 box and lasso selections in
a row (each asserted on the DOM of both maps and on the kernel's ``explorer.selection``), a layer change
after a selection, the recompute button, the first UMAP and a t-SNE of the maps, and the channel viewer's slider; in the
paper notebook, 10 selections, hover and layer changes on its explorer (three networks, feature space
beside the common space). Latencies are printed. Screenshots go to
reports/browser/ on failure; the server and the browser are stopped in every case.
"""
from __future__ import annotations

import math
import random
import re
import time

import pytest

from browser import labharness as L

NOTEBOOKS = ("getting_started.ipynb", "common_feature_learning.ipynb")
PARAMS: dict = {}   # the stored parameters: the teachers come from the cache nbval filled
REPORTS = L.ROOT / "reports" / "browser"
N_SELECTIONS = 20
N_SELECTIONS_PAPER = 10

pytestmark = pytest.mark.skipif(L.missing_requirements() is not None, reason=str(L.missing_requirements()))

# -- JavaScript run in the page ------------------------------------------------------------------
JS_CELL_PLOTS = """([marker]) => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const cell = cells.find(c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').includes(marker));
  if (!cell) return null;
  return [...cell.querySelectorAll('.js-plotly-plot')].length;
}"""

# sample indices (customdata) of the points of graph `k` of the cell inside a client-pixel polygon (and the
# points' pixel positions with `withPoints`);
# the highlighted ones per the DOM (opaque per-point markers); the drawn boxes left in the layout
JS_GRAPH = """([marker, k, poly, withPoints]) => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  const cell = cells.find(c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').includes(marker));
  const gd = cell.querySelectorAll('.js-plotly-plot')[k];
  const fl = gd._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
  const root = gd.querySelector('.main-svg').getBoundingClientRect();
  const drag = gd.querySelector('.nsewdrag').getBoundingClientRect();
  const inside = (px, py) => {
    let c = false;
    for (let i = 0, j = poly.length - 1; i < poly.length; j = i++) {
      const [xi, yi] = poly[i], [xj, yj] = poly[j];
      if (((yi > py) !== (yj > py)) && (px < (xj - xi) * (py - yi) / (yj - yi) + xi)) c = !c;
    }
    return c;
  };
  const inPoly = new Set(), selected = new Set(), points = [];
  let anySelected = false;
  gd._fullData.forEach((tr, ti) => {
    if (!tr.customdata || tr.visible !== true || (tr.meta && tr.meta.legend_only)) return;
    // what the reader sees highlighted: opaque per-point markers (kaviz's highlight), minus the points
    // plotly's own box selection dims while it lasts (selectedpoints)
    const op = gd.data[ti].marker && gd.data[ti].marker.opacity;
    const sp = gd.data[ti].selectedpoints;
    const inSp = (sp && sp.length !== undefined) ? new Set(Array.from(sp, Number)) : null;
    if (op && op.length !== undefined) {
      anySelected = true;
      for (let j = 0; j < op.length; j++) if (op[j] >= 1 && (!inSp || inSp.has(j))) selected.add(Number(tr.customdata[j]));
    }
    if (!poly && !withPoints) return;   // the highlight only: keeps each poll of a wait short
    for (let j = 0; j < tr.x.length; j++) {
      const px = root.left + xa._offset + xa.l2p(tr.x[j]), py = root.top + ya._offset + ya.l2p(tr.y[j]);
      if (px < drag.left + 2 || px > drag.right - 2 || py < drag.top + 2 || py > drag.bottom - 2) continue;
      points.push([px, py, Number(tr.customdata[j])]);
      if (poly && inside(px, py)) inPoly.add(Number(tr.customdata[j]));
    }
  });
  return {inPoly: [...inPoly].sort((a, b) => a - b), selected: anySelected ? [...selected].sort((a, b) => a - b) : null,
          boxes: (gd.layout.selections || []).length, points: points,
          drag: [drag.left, drag.top, drag.right, drag.bottom], width: root.width,
          title: (fl.title && fl.title.text) || ''};
}"""

JS_WIDTHS = """() => [...document.querySelectorAll('.jp-OutputArea-output.js-plotly-plot, .jp-OutputArea-output .js-plotly-plot')].map(gd => {
  const out = gd.closest('.jp-OutputArea-output');
  const svg = gd.querySelector('.main-svg');
  return {fig: Math.round(svg ? svg.getBoundingClientRect().width : 0), area: Math.round(out.getBoundingClientRect().width),
          title: (gd._fullLayout && gd._fullLayout.title && gd._fullLayout.title.text) || ''};
})"""

JS_ERRORS = """() => [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .map(e => e.textContent).filter(t => /Traceback|Error:/.test(t)).map(t => t.slice(0, 600))"""

JS_SHARE = """() => [...document.querySelectorAll('.modebar-btn[data-title*="Chart Studio"], .modebar-btn[data-title*="Share"], .modebar-btn.plotlyjsicon, .modebar-btn[data-title*="plotly"]')]
  .map(b => (b.closest('.jp-CodeCell')?.querySelector('.jp-InputArea-editor')?.textContent || '?').slice(0, 60))"""

JS_MIME = """() => { const outs = [...document.querySelectorAll('.jp-OutputArea-output.jp-RenderedPlotly')];
  return {outputs: outs.length, drawn: outs.filter(o => o.querySelector('.js-plotly-plot .main-svg')).length}; }"""

# the first coordinates of every map of the cell: changes when the maps are redrawn
JS_SIGNATURE = """([marker]) => { const c = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].find(
  c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').includes(marker));
  return JSON.stringify([...c.querySelectorAll('.js-plotly-plot')].map(gd => gd._fullData.filter(t => t.x && t.x.length)
    .slice(0, 2).map(t => Array.from(t.x).slice(0, 4)))); }"""

# the sample index plotly reports under the mouse in graph k of the cell (null when none)
JS_HOVERED = """([marker, k]) => { const c = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].find(
  c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').includes(marker));
  const gd = c.querySelectorAll('.js-plotly-plot')[k]; const h = gd._hoverdata;
  return h && h.length && h[0].customdata !== undefined ? Number(h[0].customdata) : null; }"""

JS_PROMPTS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim())"""


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    from kaviz import runner

    work = tmp_path_factory.mktemp("lab")
    import nbformat

    for name in NOTEBOOKS:
        nb = nbformat.read(L.ROOT / "notebooks" / name, as_version=4)
        runner.inject_parameters(nb, PARAMS, name)
        for cell in nb.cells:           # open it as a reader of a fresh clone would after Run All
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, work / name)
    REPORTS.mkdir(parents=True, exist_ok=True)
    server = L.Lab(work, REPORTS / "jupyterlab.log")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def shot(lab, request):
    """Screenshot and console log under reports/browser/ when the test fails."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and lab.page is not None:
        name = request.node.name
        try:
            lab.page.screenshot(path=str(REPORTS / f"{name}.png"), full_page=False)
        except Exception:  # noqa: BLE001
            pass
        (REPORTS / f"{name}.console.txt").write_text("\n".join(lab.console))


# -- helpers ----------------------------------------------------------------------------------------
class Problems(list):
    """Findings that do not stop the test (so that one run reports all of them); printed as found."""

    def append(self, text):
        print(f"[browser] PROBLEM: {text}")
        super().append(text)


def wait_for(fn, timeout: float, what: str, interval: float = 0.02):
    t0 = time.perf_counter()
    last = None
    while time.perf_counter() - t0 < timeout:
        last = fn()
        if last:
            return time.perf_counter() - t0, last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {str(last)[:300]})")


def run_all(lab, timeout=900):
    """Run > Run All Cells; wait until no cell is queued or running and the kernel is idle (all cells
    run, or an error stopped the run). Returns the seconds taken."""
    page = lab.page
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile(r"^Run All Cells")).first.click()
    t0 = time.perf_counter()

    def done():
        prompts = page.evaluate(JS_PROMPTS)
        if not prompts or any("*" in p for p in prompts):
            return False
        idle = all(k["execution_state"] == "idle" for k in lab.api("kernels"))
        finished = all(re.fullmatch(r"\[\d+\]:", p) for p in prompts) or page.evaluate(JS_ERRORS)
        return idle and bool(finished)
    try:
        wait_for(done, timeout, "Run All to finish", interval=1.0)
    except AssertionError:
        raise AssertionError(f"Run All did not finish in {timeout} s; prompts: {page.evaluate(JS_PROMPTS)}") from None
    return time.perf_counter() - t0


def polygon(cx, cy, r, kind, rng):
    if kind == "box":
        w, h = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        return [[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]]
    n = 10
    return [[cx + r * math.cos(2 * math.pi * i / n) * rng.uniform(0.7, 1.2),
             cy + r * math.sin(2 * math.pi * i / n) * rng.uniform(0.7, 1.2)] for i in range(n)]


def shrink(poly, px):
    """The polygon moved ``px`` pixels towards its centroid (negative: away from it)."""
    cx = sum(p[0] for p in poly) / len(poly)
    cy = sum(p[1] for p in poly) / len(poly)
    out = []
    for x, y in poly:
        d = math.hypot(x - cx, y - cy) or 1.0
        f = max(0.0, (d - px * math.sqrt(2)) / d)
        out.append([cx + (x - cx) * f, cy + (y - cy) * f])
    return out


def drag(page, poly, kind):
    m = page.mouse
    if kind == "box":
        (x0, y0), (x1, y1) = poly[0], poly[2]
        m.move(x0, y0)
        m.down()
        for t in (0.25, 0.5, 0.75, 1.0):
            m.move(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, steps=2)
        m.up()
    else:
        m.move(*poly[0])
        m.down()
        for p in poly[1:] + [poly[0]]:
            m.move(*p, steps=3)
        m.up()


def set_dragmode(page, marker, k, kind):
    """Click the modebar's Box Select / Lasso Select button of graph k (as a user would)."""
    cell = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputArea-editor", has_text=marker))
    gd = cell.locator(".js-plotly-plot").nth(k)
    gd.hover()
    title = "Box Select" if kind == "box" else "Lasso Select"
    button = gd.locator(f'.modebar-btn[data-title="{title}"]')
    try:
        button.wait_for(state="attached", timeout=5_000)
    except Exception:  # noqa: BLE001 - say what the page shows instead of a bare timeout
        shown = gd.evaluate("gd => ({traces: (gd.data || []).length, buttons: [...gd.querySelectorAll("
                            "'.modebar-btn')].map(b => b.getAttribute('data-title'))})")
        raise AssertionError(
            f"map {k} has no '{title}' button: {shown}. No traces and plotly's default modebar mean the "
            "FigureWidget view was created from its empty initial state (see docs/decisions.md, "
            "'Linked selection in the explorer')") from None
    button.click()


# -- steps ---------------------------------------------------------------------------------------
def open_and_check(lab, notebook: str, workspace: str):
    """Open ``notebook`` alone in a workspace of its own, Run All, and check what every reader sees:
    no error output, every plotly figure drawn and inside the output area, nothing from a CDN, no
    upload button. Returns a client on its kernel and the list of soft problems found."""
    page = lab.page
    page.goto(lab.url(f"lab/workspaces/{workspace}/tree/{notebook}"))
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=60_000)
    wait_for(lambda: lab.api("sessions"), 60, "the notebook's kernel to start", interval=0.5)
    time.sleep(2)
    seconds = run_all(lab)
    page.screenshot(path=str(REPORTS / f"after_run_all_{workspace}.png"))
    print(f"\n[browser] Run All of {notebook} : {seconds:.1f} s")

    errors = page.evaluate(JS_ERRORS)
    assert not errors, f"error output in the notebook: {errors}"
    kc = lab.kernel(notebook)

    # figures fit the output area (file browser open); nothing loaded from a CDN; no upload button
    mime = page.evaluate(JS_MIME)
    assert mime["outputs"] > 0 and mime["drawn"] == mime["outputs"], \
        f"plotly figure outputs drawn: {mime['drawn']} of {mime['outputs']} (JupyterLab's plotly extension)"
    widths = page.evaluate(JS_WIDTHS)
    assert widths, "no plotly figure rendered"
    too_wide = [w for w in widths if w["fig"] > w["area"]]
    assert not too_wide, f"figures wider than the output area: {too_wide}"
    print(f"[browser] {len(widths)} figures, widest {max(w['fig'] for w in widths)} px in an output area of "
          f"{min(w['area'] for w in widths)} px")
    cdn = [u for u in lab.requests if re.search(r"cdn\.|plot\.ly|unpkg|jsdelivr|cdnjs", u)]
    assert not cdn, f"requests to a CDN: {cdn[:5]}"
    problems = Problems()   # checks that do not stop the rest of the test; asserted at the end
    share = page.evaluate(JS_SHARE)
    if share:
        problems.append(f"'share chart' upload button or plotly logo on figures in the cells {share}")
    return kc, problems


def exercise_selections(page, kc, marker: str, n: int, rng, problems):
    """``n`` box and lasso selections in a row, alternating maps, each checked on the DOM of both maps
    and in the kernel (``explorer.selection``), with hover traffic in between; prints the latencies."""
    n_graphs = page.evaluate(JS_CELL_PLOTS, [marker])
    assert n_graphs == 2, f"the explorer shows {n_graphs} maps, expected 2"
    latencies, linked = [], 0
    shown = None   # the previous linked selection: it must still be shown when the next one is drawn
    for i in range(n):
        k = i % 2
        kind = "box" if (i // 2) % 2 == 0 else "lasso"
        set_dragmode(page, marker, k, kind)
        if shown is not None:
            now = [page.evaluate(JS_GRAPH, [marker, j, None])["selected"] for j in (0, 1)]
            if now != [shown, shown]:
                problems.append(f"selection {i}: no longer shown a moment later (maps show "
                                f"{[None if x is None else len(x) for x in now]} of {len(shown)} indices)")
                linked -= 1
            shown = None
        g = page.evaluate(JS_GRAPH, [marker, k, None, True])
        px, py, _ = rng.choice(g["points"])
        poly = polygon(px, py, 45, kind, rng)
        left, top, right, bottom = g["drag"]
        poly = [[min(max(x, left + 3), right - 3), min(max(y, top + 3), bottom - 3)] for x, y in poly]
        # points more than 3 px inside the drawn shape must be selected, more than 3 px outside must not
        # be; nearer its edge (mouse steps, rounding) they may go either way
        must = set(page.evaluate(JS_GRAPH, [marker, k, shrink(poly, 3)])["inPoly"])
        may = set(page.evaluate(JS_GRAPH, [marker, k, shrink(poly, -3)])["inPoly"])
        assert must, "the polygon holds no point"
        drag(page, poly, kind)
        t0 = time.perf_counter()   # from the mouse release: the moment the reader has made the selection

        def agree():
            a = page.evaluate(JS_GRAPH, [marker, 0, None])
            b = page.evaluate(JS_GRAPH, [marker, 1, None])
            got = a["selected"]
            return got is not None and must <= set(got) <= may and got == b["selected"] and (a, b)
        try:
            dt, (a, b) = wait_for(agree, 6, f"selection {i + 1} ({kind} in map {k}) shown in both maps")
        except AssertionError:
            state = L.evaluate(kc, "explorer.selection") or []
            doms = [page.evaluate(JS_GRAPH, [marker, j, None]) for j in (0, 1)]
            page.screenshot(path=str(REPORTS / f"selection_{i + 1}.png"))

            def diff(got):
                got = set(got or [])
                return f"{len(got)} indices, missing {sorted(must - got)[:8]}, extra {sorted(got - may)[:8]}"
            problems.append(
                f"selection {i + 1}/{n} ({kind} in map {k}) not linked: drawn {len(must)}..{len(may)} "
                "indices; "
                f"kernel {diff(state)}; map 0 {diff(doms[0]['selected'])} (boxes {doms[0]['boxes']}); "
                f"map 1 {diff(doms[1]['selected'])} (boxes {doms[1]['boxes']})")
            continue
        state = L.evaluate(kc, "explorer.selection")
        if state != a["selected"]:
            problems.append(f"selection {i + 1}: the kernel has {len(state or [])} indices, the maps {len(a['selected'])}")
            continue
        if a["boxes"] or b["boxes"]:
            py = L.evaluate(kc, "[len(f.layout.selections or ()) for f in explorer.figures]")
            problems.append(f"selection {i + 1}: drawn boxes left in the maps ({a['boxes']}, {b['boxes']}; "
                            f"the kernel's figures hold {py})")
        latencies.append(time.perf_counter() - t0)
        linked += 1
        shown = a["selected"]
        # hover traffic between selections, as a reader's mouse makes
        for x, y, _ in rng.sample(g["points"], 3):
            page.mouse.move(x, y, steps=2)
    print(f"[browser] linked selections: {linked}/{n}" + (
        f"; latency median {sorted(latencies)[len(latencies) // 2]:.2f} s, max {max(latencies):.2f} s (target ≤ 1 s)"
        if latencies else ""))


def exercise_hover(page, marker: str, rng, problems):
    """Hover → image in the side panel: the point plotly reports under the mouse is the one shown."""
    g = page.evaluate(JS_GRAPH, [marker, 0, None, True])
    cell = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputArea-editor", has_text=marker))
    hover_times, hovered = [], 0
    for x, y, _ in rng.sample(g["points"], 8):
        page.mouse.move(x + 60, y + 60)
        time.sleep(0.3)
        t0 = time.perf_counter()
        page.mouse.move(x, y, steps=1)
        try:
            _, idx = wait_for(lambda: page.evaluate(JS_HOVERED, [marker, 0]), 2, "plotly's hover on the point")
        except AssertionError:
            continue
        hovered += 1
        try:
            wait_for(lambda: cell.get_by_text(re.compile(rf"index {idx}\b")).count() > 0, 5,
                     f"the side panel to show index {idx}")
            hover_times.append(time.perf_counter() - t0)
        except AssertionError:
            problems.append(f"hover on index {idx}: the side panel did not show it within 5 s")
    assert hovered >= 4, f"plotly reported a hovered point {hovered}/8 times"
    if hover_times:
        print(f"[browser] hover → image: {len(hover_times)}/{hovered}, median "
              f"{sorted(hover_times)[len(hover_times) // 2]:.2f} s, max {max(hover_times):.2f} s (target ≤ 0.3 s)")


def exercise_layers(page, kc, marker: str, problems):
    """Layer changes after a selection: the same indices stay highlighted, no box left in either map."""
    selection = L.evaluate(kc, "explorer.selection")
    layers = L.evaluate(kc, "explorer.layers[explorer.model]")
    current = L.evaluate(kc, "explorer.layer")
    other = next(x for x in layers if x != current)
    cell = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputArea-editor", has_text=marker))
    layer_select = cell.locator(".widget-dropdown", has=page.locator("label", has_text="layer")).locator("select")
    for target in (other, current, other):
        sig = page.evaluate(JS_SIGNATURE, [marker])
        t0 = time.perf_counter()
        layer_select.select_option(target)
        wait_for(lambda: page.evaluate(JS_SIGNATURE, [marker]) != sig, 60, f"the maps of layer {target}")
        dt = time.perf_counter() - t0
        assert L.evaluate(kc, "explorer.layer") == target
        a = page.evaluate(JS_GRAPH, [marker, 0, None])
        b = page.evaluate(JS_GRAPH, [marker, 1, None])
        if not (a["selected"] == selection == b["selected"] and a["boxes"] == b["boxes"] == 0):
            problems.append(f"layer → {target}: kernel selection {len(selection or [])} indices, maps "
                            f"{len(a['selected'] or [])} / {len(b['selected'] or [])}, boxes {a['boxes']} / {b['boxes']}")
        timings = L.evaluate(kc, "explorer.timings")
        print(f"[browser] layer → {target}: maps redrawn in {dt:.2f} s " + (
            "(a cached map: target ≤ 0.5 s)" if timings.get("cached") else
            f"(computed: {timings.get('compute', 0):.2f} s in the kernel)"))


def exercise_recompute(page, kc, marker: str, problems):
    """The recompute button computes the current map again (not from memory); the selection stays
    highlighted in both maps, no box comes back."""
    assert L.evaluate(kc, "explorer.timings['cached']"), "control: the current map came from memory"
    selection = L.evaluate(kc, "explorer.selection")
    cell = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputArea-editor", has_text=marker))
    t0 = time.perf_counter()
    cell.locator("button", has_text="recompute").click()
    wait_for(lambda: not L.evaluate(kc, "explorer.timings['cached']"), 120, "the recompute to finish")
    dt = time.perf_counter() - t0
    a = page.evaluate(JS_GRAPH, [marker, 0, None])
    b = page.evaluate(JS_GRAPH, [marker, 1, None])
    if not (a["selected"] == selection == b["selected"] and a["boxes"] == b["boxes"] == 0):
        problems.append(f"recompute: kernel selection {len(selection or [])} indices, maps "
                        f"{len(a['selected'] or [])} / {len(b['selected'] or [])}, boxes {a['boxes']} / {b['boxes']}")
    print(f"[browser] recompute: {dt:.2f} s; status: {L.evaluate(kc, 'explorer.status.value')}")


def exercise_methods(page, kc, marker: str):
    """Method changes: the first UMAP in this fresh kernel, then t-SNE (targets ≤ 8 s and ≤ 5 s)."""
    cell = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputArea-editor", has_text=marker))
    method_select = cell.locator(".widget-dropdown", has=page.locator("label", has_text="method")).locator("select")
    offered = L.evaluate(kc, "list(explorer.methods)")
    for method, target_s in (("umap", 8.0), ("tsne", 5.0)):
        if method not in offered or L.evaluate(kc, "explorer.method") == method:
            continue
        n_points = L.evaluate(kc, "sum(len(df) for df in explorer.results)")
        sig = page.evaluate(JS_SIGNATURE, [marker])
        t0 = time.perf_counter()
        label = L.evaluate(kc, f"[lab for lab, v in explorer.method_dd.options if v == {method!r}][0]")
        method_select.select_option(label=label)
        wait_for(lambda: page.evaluate(JS_SIGNATURE, [marker]) != sig, 120, f"the {method} maps")
        dt = time.perf_counter() - t0
        timings = L.evaluate(kc, "explorer.timings")
        status = L.evaluate(kc, "explorer.status.value")
        assert "rror" not in status, f"{method}: {status}"
        print(f"[browser] method → {method}: maps redrawn in {dt:.2f} s, {n_points} points "
              f"(kernel: compute {timings.get('compute', 0):.2f} s; target ≤ {target_s:.0f} s); status: {status}")


def exercise_viewer(page):
    """The channel viewer's slider redraws its figure."""
    viewer = "widgets.linked_controls("
    vcell = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputArea-editor", has_text=viewer))
    handle = vcell.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle").first
    z0 = page.evaluate("""([m]) => { const c = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].find(
        c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').includes(m));
        const gd = c.querySelector('.js-plotly-plot'); return JSON.stringify(gd.data.map(t => t.z ? Array.from(t.z.flat ? t.z.flat() : []).slice(0, 20) : t.source && t.source.slice(0, 80)))}""",
                       [viewer])
    handle.focus()
    page.keyboard.press("ArrowRight")
    wait_for(lambda: page.evaluate("""([m]) => { const c = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].find(
        c => (c.querySelector('.jp-InputArea-editor')?.textContent || '').includes(m));
        const gd = c.querySelector('.js-plotly-plot'); return JSON.stringify(gd.data.map(t => t.z ? Array.from(t.z.flat ? t.z.flat() : []).slice(0, 20) : t.source && t.source.slice(0, 80)))}""",
                                   [viewer]) != z0, 30, "the channel viewer to redraw after the slider moved")


# -- the tests ------------------------------------------------------------------------------------
def test_getting_started_in_jupyterlab(lab, shot):
    kc, problems = open_and_check(lab, "getting_started.ipynb", "getting_started")
    page = lab.page
    marker = "widgets.EmbeddingExplorer("
    rng = random.Random(0)
    exercise_selections(page, kc, marker, N_SELECTIONS, rng, problems)
    exercise_hover(page, marker, rng, problems)
    exercise_layers(page, kc, marker, problems)
    exercise_recompute(page, kc, marker, problems)
    exercise_methods(page, kc, marker)
    exercise_viewer(page)
    assert not problems, "\n".join(problems)


def test_common_feature_learning_in_jupyterlab(lab, shot):
    """A paper notebook: its explorer (feature space beside the common space; three networks)."""
    lab.shutdown_kernels()   # the first notebook's kernel: its cores go to this one
    kc, problems = open_and_check(lab, "common_feature_learning.ipynb", "cfl")
    page = lab.page
    marker = "explorer = EmbeddingExplorer("
    rng = random.Random(1)
    exercise_selections(page, kc, marker, N_SELECTIONS_PAPER, rng, problems)
    exercise_hover(page, marker, rng, problems)
    exercise_layers(page, kc, marker, problems)
    assert not problems, "\n".join(problems)
