"""ipywidgets explorers wrapping :mod:`kaviz.plots` in FigureWidgets. No computation here.

* :class:`EmbeddingExplorer` — pick a model, a layer, an embedding method and its parameters;
  one or two linked maps (e.g. "feature space" vs "common space", CFL): a box/lasso selection in
  one map highlights the same sample indices (every source) in the other, and hovering or
  selecting shows the images in a side panel.
* :func:`linked_controls` — the generic "pick a layer / an image / a channel and redraw a figure"
  widget the per-paper notebooks need.

The callback logic is plain methods (:meth:`EmbeddingExplorer.select`, ``hover``, ``recompute``,
:meth:`LinkedControls.update`) that the plotly/ipywidgets callbacks call, so it is testable
without a browser. Callbacks never print and never raise: errors go to a status label.
Outside a live Jupyter kernel, ``show()`` returns static ``go.Figure`` objects instead.
"""
from __future__ import annotations

import io
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import plots

__all__ = ["EmbeddingExplorer", "LinkedControls", "linked_controls", "in_kernel"]

#: The parameter controls shown for each method (others get none): name -> (kind, min, max, step).
METHOD_CONTROLS = {
    "tsne": {"perplexity": ("int", 2, 100, 1)},
    "umap": {"n_neighbors": ("int", 2, 100, 1), "min_dist": ("float", 0.0, 0.99, 0.01)},
    "pca": {},
}
_PARAM_DEFAULTS = {"perplexity": 30, "n_neighbors": 15, "min_dist": 0.1}
_METHOD_LABELS = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
_SIDE_PX = 96
#: The explorer's maps stay SVG up to this many points: a highlight restyles every point, which WebGL
#: redraws in software on a machine without a GPU (a linked selection on the CFL notebook's 1,800-point
#: maps took 0.85 s median, 1.16 s max, in headless chromium), and a browser keeps only ~16 WebGL
#: contexts for a whole notebook.
_MAP_WEBGL_THRESHOLD = 5000
_MONTAGE_MAX = 12
#: Widths (px) of the explorer's row: maps plus side panel stay inside JupyterLab's output area
#: (~1,168 px at a 1,600 px window with the file browser open); the last map also holds the legend.
_ROW_PX = 1100
_SIDE_PANEL_PX = 200
_LEGEND_PX = 90
_MEMO_SIZE = 24


def in_kernel() -> bool:
    """True inside a live IPython kernel (Jupyter), where widgets can be displayed."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"⚠ {type(e).__name__}: {msg}"[:400]


def _replace_figure(fw, fig):
    """Replace the traces and layout of FigureWidget ``fw`` by those of ``fig`` (one message)."""
    with fw.batch_update():
        fw.data = []
        fw.add_traces(list(fig.data))
        fw.layout = fig.layout


class EmbeddingExplorer:
    """Linked 2-D maps with controls for the model, layer, method and method parameters.

    Parameters
    ----------
    compute : callable ``(model, layer, method, params) -> DataFrame | tuple[DataFrame, ...]``
        Does the work (feature extraction + :func:`kaviz.embed.embed`); one DataFrame per panel
        (``x, y, source, label, index``). Its errors are shown in the status label.
    models : list of str
    layers : list of str, or dict model -> list of str (the layer dropdown follows the model)
    methods : names offered in the method dropdown
    titles : one title per panel (at most this many panels)
    images : callable ``index -> image`` or array ``(N, H, W, 3)`` (uint8, or float in [0, 1];
        ``(N, 3, H, W)`` too), shown in the side panel, upscaled to ~96 px
    class_names : sequence or mapping label -> name
    defaults : dict with any of ``model, layer, method, perplexity, n_neighbors, min_dist``

    Changing the model, layer or method recomputes at once; changing a method parameter waits
    for the "recompute" button. The first map is computed on construction. A selection survives
    a recompute (the same sample indices are highlighted in the new maps).
    """

    def __init__(self, compute: Callable, *, models: Sequence[str], layers,
                 methods: Sequence[str] = ("tsne", "umap", "pca"),
                 titles: Sequence[str] = ("feature space", "common space"), images=None,
                 class_names=None, defaults: Mapping | None = None):
        import ipywidgets as W

        if not callable(compute):
            raise TypeError("compute must be a callable (model, layer, method, params) -> "
                            "DataFrame or tuple of DataFrames")
        self._compute = compute
        self.models = [str(m) for m in models]
        if not self.models:
            raise ValueError("models is empty; pass the names of the networks to explore")
        self.layers = self._check_layers(layers)
        self.methods = list(methods)
        if not self.methods:
            raise ValueError("methods is empty; e.g. methods=('tsne', 'umap', 'pca')")
        self.titles = [str(t) for t in (titles if not isinstance(titles, str) else [titles])]
        if not 1 <= len(self.titles) <= 4:
            raise ValueError(f"titles gives the panels: 1 to 4 of them, got {len(self.titles)}")
        self.images = self._check_images(images)
        self.class_names = class_names
        d = self._check_defaults(defaults or {})

        self.results: tuple = ()
        self.selection: list[int] | None = None
        self.timings: dict = {}
        self._labels: dict[int, object] = {}
        self._suspend = False
        self._memo: dict = {}
        self._browser_boxes: set[int] = set()  # maps with a box drawn in the browser, not yet removed
        self._hover_png: dict = {}

        all_layers = [x for m in self.models for x in self.layers[m]]
        self.model_dd = W.Dropdown(options=self.models, value=d["model"], description="model",
                                   layout=W.Layout(width=_dropdown_width(self.models)))
        self.layer_dd = W.Dropdown(options=self.layers[d["model"]], value=d["layer"],
                                   description="layer",
                                   layout=W.Layout(width=_dropdown_width(all_layers)))
        labels = [(_METHOD_LABELS.get(m, m), m) for m in self.methods]
        self.method_dd = W.Dropdown(
            options=labels, value=d["method"], description="method",
            layout=W.Layout(width=_dropdown_width([lab for lab, _ in labels])))
        self.param_widgets: dict[str, W.ValueWidget] = {}
        self.param_boxes: dict[str, W.Box] = {}
        for m in self.methods:
            ws = []
            for name, (kind, lo, hi, step) in METHOD_CONTROLS.get(m, {}).items():
                if name not in self.param_widgets:
                    cls = W.IntSlider if kind == "int" else W.FloatSlider
                    self.param_widgets[name] = cls(
                        value=d[name], min=lo, max=hi, step=step, description=name,
                        continuous_update=False, style={"description_width": "initial"},
                        layout=W.Layout(width="260px"))
                ws.append(self.param_widgets[name])
            self.param_boxes[m] = W.HBox(ws)
        self.recompute_btn = W.Button(description="recompute", icon="refresh",
                                      layout=W.Layout(width="120px"))
        self.status = W.Label(value="")
        self.figures = [map_widget() for _ in self.titles]
        for k, fw in enumerate(self.figures):
            fw._config = plots.PLOTLY_CONFIG  # no "share chart" button, no plotly logo
            # a box or lasso drawn in the browser: see select_region (why not on_selection)
            fw.observe(lambda change, k=k: self._on_browser_relayout(k, change),
                       names="_js2py_relayout")
        # hidden while empty (an empty Image shows a broken-image icon)
        self.side_image = W.Image(format="png", layout=W.Layout(max_width=f"{_SIDE_PANEL_PX - 10}px",
                                                                display="none"))
        self.side_caption = W.HTML(value="<i>hover or select points</i>",
                                   layout=W.Layout(width=f"{_SIDE_PANEL_PX - 10}px"))
        self.side_panel = W.VBox([self.side_caption, self.side_image],
                                 layout=W.Layout(width=f"{_SIDE_PANEL_PX}px",
                                                 min_width=f"{_SIDE_PANEL_PX}px"))

        self.model_dd.observe(self._on_model, names="value")
        self.layer_dd.observe(self._on_choice, names="value")
        self.method_dd.observe(self._on_method, names="value")
        for w in self.param_widgets.values():
            w.observe(self._on_param, names="value")
        self.recompute_btn.on_click(lambda _b: self.recompute(force=True))

        controls = W.HBox([self.model_dd, self.layer_dd, self.method_dd,
                           *self.param_boxes.values(), self.recompute_btn],
                          layout=W.Layout(flex_flow="row wrap"))
        # maps and side panel in one row (their widths add up to less than the output area)
        self._maps_box = W.HBox([*self.figures, self.side_panel],
                                layout=W.Layout(flex_flow="row nowrap", align_items="flex-start"))
        self.widget = W.VBox([controls, self.status, self._maps_box])
        self._show_param_box()
        self.recompute()

    # -- input checks ----------------------------------------------------------------------------
    def _check_layers(self, layers):
        if isinstance(layers, Mapping):
            missing = [m for m in self.models if m not in layers]
            if missing:
                raise ValueError(f"layers has no entry for models {missing}; give a list of "
                                 f"layer names per model (dict keys: {list(layers)})")
            out = {m: [str(x) for x in layers[m]] for m in self.models}
        else:
            if isinstance(layers, str):
                layers = [layers]
            out = {m: [str(x) for x in layers] for m in self.models}
        empty = [m for m, v in out.items() if not v]
        if empty:
            raise ValueError(f"no layers for models {empty}")
        return out

    @staticmethod
    def _check_images(images):
        if images is None or callable(images):
            return images
        if type(images).__module__.split(".")[0] == "torch":
            images = images.detach().cpu().numpy()
        arr = np.asarray(images)
        if arr.ndim not in (3, 4):
            raise ValueError(f"images must be a callable index -> image or an array (N, H, W, 3) "
                             f"/ (N, H, W), got shape {arr.shape}")
        return arr

    def _check_defaults(self, defaults):
        valid = ["model", "layer", "method", *_PARAM_DEFAULTS]
        unknown = [k for k in defaults if k not in valid]
        if unknown:
            raise ValueError(f"unknown defaults {unknown}; valid keys: {valid}")
        d = {**_PARAM_DEFAULTS, **defaults}
        d.setdefault("model", self.models[0])
        if d["model"] not in self.models:
            raise ValueError(f"default model {d['model']!r} is not in models {self.models}")
        d.setdefault("layer", self.layers[d["model"]][0])
        if d["layer"] not in self.layers[d["model"]]:
            raise ValueError(f"default layer {d['layer']!r} is not a layer of {d['model']!r}: "
                             f"{self.layers[d['model']]}")
        d.setdefault("method", self.methods[0])
        if d["method"] not in self.methods:
            raise ValueError(f"default method {d['method']!r} is not in methods {self.methods}")
        return d

    # -- state -------------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.model_dd.value

    @property
    def layer(self) -> str:
        return self.layer_dd.value

    @property
    def method(self) -> str:
        return self.method_dd.value

    def params(self) -> dict:
        """The current method's parameters, as passed to ``compute``."""
        return {name: self.param_widgets[name].value
                for name in METHOD_CONTROLS.get(self.method, {})}

    # -- the logic the callbacks call --------------------------------------------------------------
    def recompute(self, force: bool = False) -> bool:
        """Call ``compute`` with the current choices and redraw the maps. Never raises: an error
        is shown in the status label (the previous maps stay). Returns True on success. Maps
        already computed in this explorer are redrawn from memory unless ``force`` (the
        "recompute" button forces)."""
        try:
            if force:
                self._memo.pop(self._memo_key(), None)
            return self._recompute()
        except Exception as e:  # noqa: BLE001 - the promise above: a callback must never raise
            self.status.value = f"{_error_text(e)} (while drawing the maps)"
            return False

    def _recompute(self) -> bool:
        args = (self.model, self.layer, self.method, self.params())
        name = _METHOD_LABELS.get(self.method, self.method)
        key = self._memo_key()
        t0 = time.perf_counter()
        cached = key in self._memo
        if not cached:
            self.status.value = f"computing {name} of {self.model} · {self.layer} …"
        try:
            if cached:  # maps already drawn once in this explorer: no compute, no figure build
                dfs, seconds, figs = self._memo[key]
                t1 = time.perf_counter()
            else:
                dfs = self._check_result(self._compute(*args))
                seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
                widths = _panel_widths(len(dfs))
                figs = [plots.embedding_scatter(
                            df, class_names=self.class_names, height=430, width=widths[k],
                            webgl_threshold=_MAP_WEBGL_THRESHOLD,
                            title=plots.map_title(
                                title, model=args[0], method=args[2], params=args[3] or None,
                                # the chosen layer is the first map's; another panel may show
                                # another layer (getting_started: the penultimate one) and names
                                # it through df.attrs["layer"] if it wants it in the title
                                layer=df.attrs.get("layer", args[1] if k == 0 else None)))
                        for k, (df, title) in enumerate(zip(dfs, self.titles))]
                _fit_titles(figs, widths)
        except Exception as e:  # noqa: BLE001 - shown to the user, never raised from a callback
            self.status.value = f"{_error_text(e)} (model={args[0]}, layer={args[1]}, " \
                                f"method={args[2]}, params={args[3]})"
            return False
        if not cached:
            self._memo[key] = (dfs, seconds, figs)
            while len(self._memo) > _MEMO_SIZE:
                self._memo.pop(next(iter(self._memo)))
        self._labels = {}
        for df in dfs:
            if "label" in df.columns:
                for i, lab in zip(df["index"].to_numpy(), df["label"].to_numpy()):
                    self._labels.setdefault(int(i), lab)
        keep, montage, dropped = self.selection, None, ""
        if keep:  # the same sample indices stay highlighted in the new maps (checked first)
            try:
                montage = self._check_indices(keep)
            except Exception as e:  # noqa: BLE001 - the maps are drawn; only the selection is lost
                keep, dropped = None, f" · selection cleared ({_error_text(e)})"
        for k, (fw, fig) in enumerate(zip(self.figures, figs)):
            last = k == len(figs) - 1
            # one legend is enough (same classes, same networks): on the last panel
            fig.update_layout(showlegend=last)
            # the highlight and the cleared boxes travel in the same message as the new maps
            plots.highlight(fig, keep)
            _update_figure(fw, fig, browser_box=k in self._browser_boxes)
            if k in self._browser_boxes:
                _reset_browser_selection(fw)
            self._bind(k)
        self._browser_boxes.clear()
        for fw in self.figures[len(figs):]:
            _replace_figure(fw, _empty_figure())
        # a FigureWidget's .layout is plotly's, not the ipywidgets one: hide unused panels by
        # leaving them out of the box
        kids = (*self.figures[:len(figs)], self.side_panel)
        if tuple(self._maps_box.children) != kids:
            self._maps_box.children = tuple(sync_views(w) for w in kids)
        self.results = tuple(dfs)
        if keep:
            self._show_selection(keep, montage)
        elif self.selection:
            self.selection = None
            self._set_side("<i>hover or select points</i>", b"")
        t2 = time.perf_counter()
        self.timings = {"compute": 0.0 if cached else seconds, "draw": t2 - t1, "cached": cached}
        parts = [f"{name} of {self.model} · {self.layer}: "
                 f"{' + '.join(str(len(df)) for df in dfs)} points in {seconds:.1f} s"
                 + (" (computed before)" if cached else "")]
        tw = [df.attrs.get("trustworthiness") for df in dfs]
        if all(t is not None for t in tw):
            parts.append("trustworthiness " + " / ".join(f"{t:.3f}" for t in tw))
        self.status.value = " · ".join(parts) + dropped
        return True

    def _memo_key(self):
        return (self.model, self.layer, self.method, tuple(sorted(self.params().items())))

    def select(self, indices) -> None:
        """Highlight the sample ``indices`` (every source, every panel), dim the rest, and show
        their images in the side panel. ``None`` or an empty selection clears it. A selection
        whose images cannot be shown (an index outside ``images``) raises before anything
        changes: the previous selection stays. Boxes and lassos drawn on the maps are removed
        (the highlight alone shows the selection, the same in every map)."""
        if indices is not None:
            indices = sorted({int(i) for i in np.asarray(list(indices)).ravel()})
            if not indices:
                indices = None
        montage = None if indices is None else self._check_indices(indices)  # may raise: nothing set yet
        self.selection = indices
        for k, fw in enumerate(self.figures):
            with fw.batch_update():  # one message: box removed, highlight set
                _clear_boxes(fw, browser_box=k in self._browser_boxes)
                plots.highlight(fw, indices)
            if k in self._browser_boxes:
                _reset_browser_selection(fw)
        self._browser_boxes.clear()
        if indices is None:
            self._set_side("<i>hover or select points</i>", b"")
        else:
            self._show_selection(indices, montage)

    def select_region(self, panel: int, shapes) -> list[int]:
        """Select the points inside ``shapes`` drawn on map ``panel``: plotly selection shapes
        (``layout.selections`` entries in data coordinates: ``{"type": "rect", "x0", "x1",
        "y0", "y1"}`` for a box, ``{"type": "path", "path": "M x,y L x,y … Z"}`` for a lasso;
        several shapes: their union). An empty ``shapes`` clears the selection. Returns the
        selected sample indices (every source), as :meth:`select` highlights them.

        This is how a box or lasso drawn in the browser arrives: plotly.js reports the drawn
        shape as a ``relayout`` message (``selections``), which the kernel always receives,
        whereas its ``plotly_selected`` points event shares one widget trait with the hover
        events and is overwritten by them whenever a message is still pending (ipywidgets
        merges pending state updates) — see docs/decisions.md."""
        if not 0 <= int(panel) < len(self.figures):
            raise IndexError(f"panel {panel} does not exist: the explorer has "
                             f"{len(self.figures)} maps (titles={self.titles})")
        fw = self.figures[int(panel)]
        shapes = [dict(s) for s in (shapes or ()) if isinstance(s, Mapping)]
        picked = set()
        for tr in fw.data:
            meta = tr.meta if isinstance(tr.meta, dict) else {}
            if meta.get("legend_only") or tr.customdata is None or tr.x is None:
                continue
            if tr.visible not in (None, True):  # a class hidden from the legend: not selectable
                continue
            x = np.asarray(tr.x, dtype=float)
            y = np.asarray(tr.y, dtype=float)
            inside = np.zeros(len(x), bool)
            for shape in shapes:
                inside |= _inside_shape(shape, x, y)
            cd = np.asarray(tr.customdata).reshape(len(x), -1)[:, 0]
            picked.update(int(i) for i in cd[inside])
        self.select(sorted(picked) or None)
        return sorted(picked)

    def hover(self, index) -> None:
        """Show the image of sample ``index`` with its index and label in the side panel."""
        index = int(index)
        caption = f"<b>index {index}</b><br>label: {_html(self._label_name(index))}"
        png = b""
        if self.images is not None:
            png = self._hover_png.get(index)
            if png is None:
                png = plots.png_bytes(self._image(index), size=_SIDE_PX)
                if len(self._hover_png) > 4096:
                    self._hover_png.clear()
                self._hover_png[index] = png
        self._set_side(caption, png)

    def clear_selection(self) -> None:
        self.select(None)

    # -- display -----------------------------------------------------------------------------------
    def static_figures(self) -> list:
        """The current maps as plain ``go.Figure`` objects (no widgets)."""
        import plotly.graph_objects as go

        return [go.Figure(fw) for fw in self.figures[:len(self.results)]]

    def show(self):
        """Display the widget in a live kernel (returns None); elsewhere return static figures."""
        if in_kernel():
            from IPython.display import display

            display(sync_views(self.widget))
            return None
        return self.static_figures()

    def _ipython_display_(self):
        from IPython.display import display

        if in_kernel():
            display(sync_views(self.widget))
        else:
            for fig in self.static_figures():
                display(fig)

    # -- internals ---------------------------------------------------------------------------------
    def _check_result(self, out):
        import pandas as pd

        dfs = (out,) if isinstance(out, pd.DataFrame) else tuple(out) \
            if isinstance(out, (tuple, list)) else None
        if dfs is None or not dfs or not all(isinstance(d, pd.DataFrame) for d in dfs):
            raise TypeError(f"compute must return a DataFrame or a tuple of DataFrames (one per "
                            f"panel), got {type(out).__name__}")
        if len(dfs) > len(self.titles):
            raise ValueError(f"compute returned {len(dfs)} DataFrames but there are "
                             f"{len(self.titles)} panels (titles={self.titles}); pass more titles")
        return dfs

    def _bind(self, k):
        fw = self.figures[k]
        for tr in fw.data:
            # hover only: box and lasso selections arrive as relayout messages (select_region)
            tr.on_hover(lambda trace, points, state: self._safe(self._on_hover, trace, points))

    def _on_browser_relayout(self, k, change):
        """A relayout from the browser: a box or lasso drawn (``selections``), or removed by a
        click in select mode (empty ``selections``). Other relayouts (zoom, pan) are ignored, as
        are edits of a drawn box (``selections[0].x0``: boxes are removed once applied)."""
        msg = change.get("new")
        if not msg or not isinstance(msg, Mapping):
            return
        data = msg.get("relayout_data") or {}
        if "selections" not in data:
            return
        shapes = [_clean_shape(s) for s in (data["selections"] or []) if isinstance(s, Mapping)]
        if shapes:
            # the browser shows a box the kernel's layout does not hold (plotly's widget drops
            # it: its undefined fields fail validation); select() removes it
            self._browser_boxes.add(k)
        self._safe(self.select_region, k, shapes)

    def _safe(self, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - callbacks report, never raise
            self.status.value = _error_text(e)

    def _on_hover(self, trace, points):
        if points.point_inds and trace.customdata is not None:
            self.hover(trace.customdata[points.point_inds[0]])

    def _check_indices(self, indices) -> bytes:
        """The montage of ``indices`` (b"" without images); raises for an index without image."""
        if self.images is not None and not callable(self.images):
            outside = [i for i in indices if not 0 <= i < len(self.images)]
            if outside:
                raise IndexError(f"sample indices {outside[:5]} are outside the images array "
                                 f"(N={len(self.images)}); pass images for every sample index")
        return self._montage(indices[:_MONTAGE_MAX]) if self.images is not None else b""

    def _show_selection(self, indices, montage=None):
        if montage is None:
            montage = self._check_indices(indices)
        shown = min(len(indices), _MONTAGE_MAX)
        more = f" (first {shown} shown)" if len(indices) > shown else ""
        counts = sorted(Counter(self._label_name(i) for i in indices).items(),
                        key=lambda kv: (-kv[1], kv[0]))  # most frequent label first
        lab = ", ".join(f"{_html(n)} ×{c}" for n, c in counts[:6]) + (" …" if len(counts) > 6 else "")
        self._set_side(f"<b>{len(indices)} selected</b>{more}<br><small>labels: {lab}</small>",
                       montage)

    def _set_side(self, caption, png):
        self.side_caption.value = caption
        self.side_image.value = png or b""
        self.side_image.layout.display = None if png else "none"

    def _on_model(self, change):
        if self._suspend:
            return
        self._suspend = True
        try:
            layers = self.layers[change["new"]]
            keep = self.layer_dd.value if self.layer_dd.value in layers else layers[0]
            self.layer_dd.options = layers
            self.layer_dd.value = keep
        finally:
            self._suspend = False
        self.recompute()

    def _on_choice(self, change):
        if not self._suspend:
            self.recompute()

    def _on_method(self, change):
        self._show_param_box()
        if not self._suspend:
            self.recompute()

    def _on_param(self, change):
        if not self._suspend:
            self.status.value = "parameters changed: press “recompute”"

    def _show_param_box(self):
        for m, box in self.param_boxes.items():
            box.layout.display = None if m == self.method and box.children else "none"

    def _label_name(self, index):
        lab = self._labels.get(int(index), None)
        if lab is None or (isinstance(lab, float) and np.isnan(lab)):
            return "—"
        return plots.class_name(lab, self.class_names)

    def _image(self, index):
        if callable(self.images):
            return self.images(int(index))
        if not 0 <= index < len(self.images):
            raise IndexError(f"sample index {index} is outside the images array "
                             f"(N={len(self.images)}); pass images for every sample index")
        return self.images[index]

    def _montage(self, indices):
        from PIL import Image

        tiles = [plots.to_rgb_uint8(self._image(i)) for i in indices]
        cols = min(4, len(tiles))
        rows = -(-len(tiles) // cols)
        px = 48
        sheet = Image.new("RGB", (cols * (px + 2), rows * (px + 2)), "white")
        for k, t in enumerate(tiles):
            im = Image.fromarray(t).resize((px, px), Image.NEAREST)
            sheet.paste(im, ((k % cols) * (px + 2), (k // cols) * (px + 2)))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG", compress_level=1)  # fast: a montage per selection
        return buf.getvalue()


def _dropdown_width(options, description_px: int = 90) -> str:
    """A dropdown as wide as its longest option (~7.5 px a character at JupyterLab's 13 px font,
    plus the description and the arrow), between 150 and 480 px."""
    longest = max((len(str(o)) for o in options), default=8)
    return f"{int(min(max(description_px + 7.5 * longest + 30, 150), 480))}px"


def _fit_titles(figs, widths, height: int = 430, font_px: int = 13) -> None:
    """Titles broken into lines that fit each map's width (a map title names space, model, layer
    and method, and would be cut at the map's edge), with the same top margin on every panel so
    that the maps stay aligned; the last panel keeps the legend rows below its map, the others
    are ``height`` tall plus the title lines."""
    titles = [plots.wrap_title(f.layout.title.text or "", w, font_px=font_px) for f, w in zip(figs, widths)]
    extra = 18 * max((t.count("<br>") for t in titles), default=0)
    for k, (fig, title) in enumerate(zip(figs, titles)):
        fig.update_layout(title_text=title or None, title_font_size=font_px, margin_t=fig.layout.margin.t + extra)
        if k < len(figs) - 1:  # no room kept for a (hidden) legend: maps of equal size
            fig.update_layout(height=height + extra, margin_b=10)
        else:
            fig.update_layout(height=fig.layout.height + extra)
        if extra:  # title lines from the top down, clear of a legend row above the map
            # (plotly anchors a multi-line title by its first line: 22 px puts that line ~10 px down)
            fig.update_layout(title_yref="container", title_yanchor="top", title_y=1 - 22 / fig.layout.height)


def _panel_widths(n: int) -> list[int]:
    """Widths of ``n`` maps that, with the side panel, fit :data:`_ROW_PX`; the last map is wider
    by the legend it holds."""
    each = (_ROW_PX - _SIDE_PANEL_PX - _LEGEND_PX) // max(n, 1)
    return [each] * (n - 1) + [each + _LEGEND_PX]


_MAP_WIDGET = None


def sync_views(widget):
    """Make the state a new browser view starts from current for every plotly FigureWidget in the
    widget tree ``widget``; returns ``widget``. Call it before displaying a box that holds
    FigureWidgets, or before adding one to a displayed box.

    A FigureWidget's view draws from the model's ``_widget_data`` / ``_widget_layout`` / ``_config``
    and then applies the edit messages that follow. plotly refreshes those fields only when the
    FigureWidget itself is displayed (``_repr_mimebundle_``), never as a child of a box, and edits
    sent before the browser has loaded plotly's widget code change nothing there: such a view
    showed empty axes and plotly's default toolbar (2 of 5 page loads, tests/browser)."""
    from plotly.basewidget import BaseFigureWidget

    stack = [widget]
    while stack:
        w = stack.pop()
        if isinstance(w, BaseFigureWidget):
            w._repr_mimebundle_()  # plotly's own refresh of _widget_data / _widget_layout
            w.send_state(["_widget_data", "_widget_layout", "_config"])  # sent even when unchanged
        stack.extend(getattr(w, "children", None) or ())
    return widget


def map_widget(*args, **kwargs):
    """A ``go.FigureWidget`` for maps whose selection the kernel owns (the explorer's): plotly's
    ``plotly_selected`` / ``plotly_deselect`` points events are dropped. Plain FigureWidget
    answers each of them by setting every trace's ``selectedpoints`` to the event's points and
    sending that back, one message per trace; after the box that made a selection is removed,
    plotly.js reports an empty selection, so the echo dimmed every point of the map where the box
    was drawn, a second after the highlight was drawn (measured with tests/browser; see
    docs/decisions.md). Hover and click events are dispatched as usual."""
    global _MAP_WIDGET
    if _MAP_WIDGET is None:
        import plotly.graph_objects as go
        from traitlets import observe

        class MapWidget(go.FigureWidget):
            @observe("_js2py_pointsCallback")
            def _handler_js2py_pointsCallback(self, change):
                new = change["new"]
                if new and new.get("event_type") in ("plotly_selected", "plotly_deselect"):
                    self._js2py_pointsCallback = None
                    return
                super()._handler_js2py_pointsCallback(change)

        _MAP_WIDGET = MapWidget
    return _MAP_WIDGET(*args, **kwargs)


def _update_figure(fw, fig, browser_box: bool = False):
    """Redraw FigureWidget ``fw`` as ``fig``. With the same traces (same classes and sources: a
    new layer or method of the same samples) only the coordinates, sample indices, highlight and
    title are sent, in one message; otherwise the figure is replaced."""
    same = len(fw.data) == len(fig.data) and all(
        a.type == b.type and a.name == b.name and a.meta == b.meta
        and _same(a.marker.color, b.marker.color) and a.marker.symbol == b.marker.symbol
        for a, b in zip(fw.data, fig.data))
    if not same:
        with fw.batch_update():
            _clear_boxes(fw, browser_box=browser_box)
        _replace_figure(fw, fig)
        return False
    with fw.batch_update():
        _clear_boxes(fw, browser_box=browser_box)
        for a, b in zip(fw.data, fig.data):
            a.x, a.y, a.customdata = b.x, b.y, b.customdata
            if a.text is not None or b.text is not None:
                a.text = b.text
            a.selectedpoints = None
            a.marker.opacity, a.meta = b.marker.opacity, b.meta
        fw.layout.title = fig.layout.title
        fw.layout.xaxis.title = fig.layout.xaxis.title
        fw.layout.yaxis.title = fig.layout.yaxis.title
        fw.layout.xaxis.autorange = True
        fw.layout.yaxis.autorange = True
    return True


_ANY_BOX = {"type": "rect", "xref": "x", "yref": "y", "x0": 0, "x1": 0, "y0": 0, "y1": 0}


def _clear_boxes(fw, browser_box: bool = False):
    """Remove the boxes and lassos drawn on ``fw``. Call inside ``fw.batch_update()``.

    ``browser_box``: a box drawn in the browser, which the kernel's layout does not hold, so that
    plotly would see no change to send. A placeholder box set and removed in the same batch makes
    the batch carry ``selections: []`` to the browser (one message, no redraw of the box)."""
    if browser_box and not fw.layout.selections:
        fw.layout.selections = [_ANY_BOX]
    if fw.layout.selections:
        fw.layout.selections = ()


def _reset_browser_selection(fw):
    """Tell the browser that no point of ``fw`` is in plotly's own selection state (the box that
    set it is gone): the browser set ``selectedpoints`` itself, which the kernel never sees, so
    plotly's change detection would send nothing; the restyle is sent directly."""
    idx = [i for i, tr in enumerate(fw.data) if tr.customdata is not None]
    if idx:
        fw._send_restyle_msg({"selectedpoints": [None] * len(idx)}, trace_indexes=idx)


def _clean_shape(shape) -> dict:
    """A selection shape from the browser without plotly's "undefined" placeholders."""
    keys = ("type", "xref", "yref", "x0", "x1", "y0", "y1", "path")
    return {k: shape[k] for k in keys if isinstance(shape.get(k), (str, int, float))}


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _inside_shape(shape, x, y):
    """Boolean mask of the points ``(x, y)`` inside a plotly selection shape (data coordinates):
    a ``rect`` (x0, x1, y0, y1) or a ``path`` polygon ("M x,y L x,y … Z"; even-odd rule)."""
    kind = shape.get("type")
    if kind == "rect":
        x0, x1 = sorted((float(shape["x0"]), float(shape["x1"])))
        y0, y1 = sorted((float(shape["y0"]), float(shape["y1"])))
        return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    if kind == "path":
        nums = [float(v) for v in _NUMBER.findall(str(shape.get("path", "")))]
        poly = np.asarray(nums[: len(nums) // 2 * 2]).reshape(-1, 2)
        inside = np.zeros(len(x), bool)
        if len(poly) < 3:
            return inside
        px, py = poly[:, 0], poly[:, 1]
        qx, qy = np.roll(px, 1), np.roll(py, 1)
        for xi, yi, xj, yj in zip(px, py, qx, qy):  # ray casting, one edge at a time
            if yi == yj:
                continue
            crosses = (yi > y) != (yj > y)
            xcross = (xj - xi) * (y - yi) / (yj - yi) + xi
            inside ^= crosses & (x < xcross)
        return inside
    raise ValueError(f"unknown selection shape type {kind!r}: expected 'rect' (a box) or "
                     f"'path' (a lasso), as plotly's layout.selections holds")


def _empty_figure():
    import plotly.graph_objects as go

    return go.Figure(layout=dict(width=10, height=10, xaxis_visible=False, yaxis_visible=False))


def _html(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------------------
# a generic "controls -> figure" widget
# ------------------------------------------------------------------------------------------------
class LinkedControls:
    """Controls whose values are passed to ``fn(**values)``; its result is redrawn on change.

    ``fn`` returns a plotly figure (drawn in a ``go.FigureWidget``, updated in place) or any
    displayable object (drawn in an ``ipywidgets.Output``). Errors from ``fn`` go to ``status``;
    the last good output stays. Use :func:`linked_controls` to build one.
    """

    def __init__(self, fn: Callable, controls: Mapping, *, title: str | None = None):
        import ipywidgets as W

        if not callable(fn):
            raise TypeError("fn must be a callable taking the control values as keywords")
        if not controls:
            raise ValueError("give at least one control, e.g. layer=['layer1', 'layer2']")
        self.fn = fn
        self.controls = {name: _make_control(name, spec) for name, spec in controls.items()}
        self.status = W.Label(value="")
        self.figure = None
        self.output = W.Output()
        self.result = None
        self._suspend = False
        for w in self.controls.values():
            w.observe(self._on_change, names="value")
        header = [W.HTML(f"<b>{_html(title)}</b>")] if title else []
        self._box = W.VBox([*header, W.HBox(list(self.controls.values()),
                                            layout=W.Layout(flex_flow="row wrap")),
                            self.status, self.output])
        self.widget = self._box
        self.render()

    @property
    def values(self) -> dict:
        return {k: w.value for k, w in self.controls.items()}

    def update(self, **values) -> bool:
        """Set some control values and redraw once. Unknown names raise (this is called by code,
        not by a widget callback). Returns True when ``fn`` succeeded."""
        unknown = [k for k in values if k not in self.controls]
        if unknown:
            raise ValueError(f"unknown controls {unknown}; controls: {list(self.controls)}")
        for k, v in values.items():  # all checked before any is set: no half-applied update
            _check_value(k, self.controls[k], v)
        self._suspend = True
        try:
            for k, v in values.items():
                self.controls[k].value = v
        finally:
            self._suspend = False
        return self.render()

    def render(self) -> bool:
        """Call ``fn(**values)`` and redraw. Never raises: errors are shown in ``status``."""
        from plotly.basedatatypes import BaseFigure

        try:
            result = self.fn(**self.values)
        except Exception as e:  # noqa: BLE001 - shown to the user, never raised from a callback
            self.status.value = f"{_error_text(e)} ({_fmt_values(self.values)})"
            return False
        self.result = result
        if isinstance(result, BaseFigure):
            import plotly.graph_objects as go

            self.output.outputs = ()
            if self.figure is None:
                self.figure = go.FigureWidget(result)
                self.figure._config = plots.PLOTLY_CONFIG  # no "share chart" button, no logo
            else:
                _replace_figure(self.figure, result)
            self._show(self.figure)
        else:
            # fn switched from a figure to something else: the stale figure must go
            self.figure = None
            self.output.outputs = ()
            if result is not None:
                self.output.append_display_data(result)
            self._show(self.output)
        self.status.value = ""
        return True

    def _show(self, view):
        """Make ``view`` (the FigureWidget or the Output) the last child of the box, alone."""
        kids = tuple(c for c in self._box.children if c is not self.output and not _is_figure_widget(c))
        if view not in self._box.children:
            self._box.children = kids + (sync_views(view),)

    def show(self):
        """Display the widget in a live kernel (returns None); elsewhere return ``fn``'s result
        for the current values (a static figure)."""
        if in_kernel():
            from IPython.display import display

            display(sync_views(self.widget))
            return None
        return self.result

    def _ipython_display_(self):
        from IPython.display import display

        display(sync_views(self.widget) if in_kernel() else self.result)

    def _on_change(self, change):
        if not self._suspend:
            self.render()


def linked_controls(fn: Callable, *, title: str | None = None, **controls) -> LinkedControls:
    """Build a :class:`LinkedControls`: ``fn(**values)`` is redrawn whenever a control changes.

    Each keyword is a control: a list/tuple of options (a dropdown; the first is the initial
    value), a dict ``label -> value`` (a dropdown with labels), a ``range`` (an integer slider,
    e.g. ``channel=range(64)``) or a ready ipywidgets value widget. Example::

        linked_controls(lambda layer, image, channel: plots.feature_grid(...),
                        layer=["layer1", "layer2"], image=range(16), channel=range(64))
    """
    return LinkedControls(fn, controls, title=title)


def _make_control(name, spec):
    import ipywidgets as W

    if isinstance(spec, W.ValueWidget):
        if not spec.description:
            spec.description = name
        return spec
    style = {"description_width": "initial"}
    if isinstance(spec, range):
        if len(spec) == 0:
            raise ValueError(f"control {name!r}: empty range")
        return W.IntSlider(value=spec.start, min=spec.start, max=spec[-1], step=spec.step,
                           description=name, continuous_update=False, style=style)
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError(f"control {name!r}: no options")
        return W.Dropdown(options=[(str(k), v) for k, v in spec.items()], description=name,
                          style=style)
    if isinstance(spec, (list, tuple)) or (isinstance(spec, np.ndarray) and spec.ndim == 1):
        opts = list(spec)
        if not opts:
            raise ValueError(f"control {name!r}: no options")
        return W.Dropdown(options=opts, value=opts[0], description=name, style=style)
    raise TypeError(f"control {name!r}: expected a list of options, a dict label -> value, a "
                    f"range or an ipywidgets value widget, got {type(spec).__name__}")


def _is_figure_widget(w) -> bool:
    return type(w).__name__ == "FigureWidget"


def _check_value(name, widget, value):
    """Refuse a value a slider would silently clamp (``update(channel=99)`` on ``range(64)``) or
    that a dropdown does not offer, before anything is set."""
    options = getattr(widget, "options", None)
    if options is not None and not isinstance(options, str):
        valid = [o[1] if isinstance(o, tuple) and len(o) == 2 else o for o in options]
        if not any(value is v or _same(value, v) for v in valid):
            shown = ", ".join(repr(v) for v in valid[:10]) + (" ..." if len(valid) > 10 else "")
            raise ValueError(f"control {name!r}: {value!r} is not one of its options ({shown})")
        return
    lo, hi = getattr(widget, "min", None), getattr(widget, "max", None)
    if lo is None or hi is None or isinstance(value, bool):
        return
    try:
        inside = lo <= value <= hi
    except TypeError:
        raise TypeError(f"control {name!r}: expected a number in [{lo}, {hi}], got {value!r}") from None
    if not inside:
        raise ValueError(f"control {name!r}: {value!r} is outside its range [{lo}, {hi}]; the slider "
                         f"would clamp it to {min(max(value, lo), hi)!r}. Pass a value in range.")


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and odd types: not equal
        return False


def _fmt_values(values):
    return ", ".join(f"{k}={v!r}" for k, v in values.items())
