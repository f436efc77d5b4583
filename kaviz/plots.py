"""Figure builders: take results (DataFrames, arrays), return plotly figures. No computation.

* :func:`embedding_scatter` — a 2-D map from :func:`kaviz.embed.embed` (colour = class,
  symbol = network, ``customdata`` = sample index for linking); :func:`highlight` dims everything
  but a set of sample indices (used by the widgets' linked selection).
* :func:`training_curves` — loss terms and metrics per epoch from a training history, one run or
  several overlaid (KD vs CFL students, seeds).
* :func:`feature_grid` — a grid of 2-D maps on a diverging colour scale symmetric about 0, with
  optional RGB image panels (the Knowledge-Consistency component figure).
* :func:`image_grid`, :func:`bar` — small helpers the notebooks would otherwise re-write.
* :func:`dense_predictions` — the one dense-panel builder: input, ground truth and models' class
  maps, depth maps and reconstructions side by side (SBM, recombination); :func:`label_image` /
  :func:`scalar_image` colour one map as an image.
* :func:`metric_curves` — metrics against one variable (quality against parameters pruned).

Stored outputs stay small: coordinates are rounded to 3 decimals, heatmaps are float32, images are
embedded as PNG at their own resolution.
"""
from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["embedding_scatter", "highlight", "training_curves", "feature_grid", "image_grid",
           "bar", "palette", "palette_tier", "SYMBOLS", "to_rgb_uint8", "png_bytes", "side_by_side",
           "label_image", "scalar_image", "dense_predictions", "map_title", "fit_width", "MAX_WIDTH",
           "PLOTLY_CONFIG", "heat_scale", "class_name", "wrap_title"]

# Colour-blind aware base hues: Okabe & Ito's set (its yellow darkened a little to read on white, its
# black replaced by indigo), then wine and grey. The first eight stay apart under simulated deutan and
# protan vision (tests/test_plots.py checks it). Beyond ten classes the same ten hues come again in
# further lightness tiers (light, then dark, ...), so classes i and i + 10 share a hue and differ in
# lightness; embedding_scatter outlines light-tier markers in their base hue (a cue besides colour).
_BASE10 = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#D9C600", "#332288",
           "#882255", "#6E6E6E"]
# tier k mixes the base hue with white (> 0) or black (< 0) by this fraction
_TIERS = (0.0, 0.55, -0.45, 0.78, -0.68)
_NO_LABEL_COLOR = "#B0B0B0"
#: Marker symbols per source (network), all available in both Scatter and Scattergl.
SYMBOLS = ["circle", "diamond", "square", "x", "triangle-up", "cross", "star", "triangle-down",
           "hexagon", "pentagon"]
#: The widest a figure is drawn (px): JupyterLab's output area is ~1,168 px at 1,600 px with the file
#: browser open, so every figure fits it with a margin. Figures without a fixed width fill their cell.
MAX_WIDTH = 1100
#: The plotly configuration every kaviz figure and FigureWidget is shown with: no "share chart"
#: (upload) button, no plotly logo, PNG export at twice the resolution.
PLOTLY_CONFIG = {"displaylogo": False, "showSendToCloud": False,
                 "modeBarButtonsToRemove": ["sendDataToCloud", "sendChartToCloud", "editInChartStudio"],
                 "toImageButtonOptions": {"scale": 2}}
_METRIC_RE = re.compile(r"acc|(^|_)map($|_)|iou|auc|(^|_)f1($|_)|top\d|precision|recall|"
                        r"agree|consisten|rmse|abs_rel|delta|error", re.I)
_SPLITS = ("train", "val", "test")
_SPLIT_DASH = {"train": "solid", "val": "dash", "test": "dot"}


def _mix(color: str, t: float) -> str:
    """``color`` mixed with white (``t`` > 0) or black (``t`` < 0) by the fraction ``|t|``."""
    r, g, b = _hex_rgb(color)
    target = 255 if t > 0 else 0
    f = abs(t)
    return "#%02X%02X%02X" % tuple(int(round(v + (target - v) * f)) for v in (r, g, b))


def palette(n: int) -> list[str]:
    """``n`` qualitative colours, readable on white and colour-blind aware: ten base hues, then the
    same hues in further lightness tiers (``palette(20)[i]`` and ``[i + 10]`` share a hue). Distinct
    up to 50 colours; cycles beyond."""
    out = []
    for i in range(n):
        tier, hue = divmod(i, len(_BASE10))
        out.append(_mix(_BASE10[hue], _TIERS[tier % len(_TIERS)]))
    return out


def palette_tier(i: int) -> int:
    """The lightness tier of ``palette(n)[i]`` (0 for the first ten colours)."""
    return (i // len(_BASE10)) % len(_TIERS)


def fit_width(width: float | None, limit: int = MAX_WIDTH) -> int | None:
    """``width`` capped at ``limit`` px (``None`` stays ``None``: the figure fills its cell)."""
    return None if width is None else int(min(width, limit))


def wrap_title(text: str, width: int | None = None, font_px: int = 17) -> str:
    """A figure title broken into ``<br>`` lines that fit ``width`` px (``None``: the ~650 px of a
    narrow notebook cell), so that a long title is not cut at the figure's edge (plotly never
    wraps titles). Breaks at spaces; a title that fits is returned unchanged."""
    import textwrap

    # plotly puts the title at 5 % of the width; a character is ~0.5 em wide on average (measured on
    # kaleido PNGs: a 17 px title was cut after ~78 characters in a 700 px figure)
    chars = max(20, int((0.95 * (width or 650) - 10) / (0.5 * font_px)))
    text = str(text)
    return text if len(text) <= chars else "<br>".join(textwrap.wrap(text, chars))


def map_title(space: str | None = None, *, model: str | None = None, layer: str | None = None,
              method: str | None = None, params: Mapping | None = None) -> str:
    """A map's title that keeps its context in an exported PNG: ``"feature space · resnet ·
    layer3 · t-SNE (perplexity 30)"``. Parts left ``None`` are omitted."""
    m = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}.get(method, method)
    if m and params:
        m += " (" + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in params.items()) + ")"
    return " · ".join(str(p) for p in (space, model, layer, m) if p not in (None, ""))


def _legend_below(fig, names: Sequence[str], width: int | None, height: int,
                  plot_bottom: int = 40) -> int:
    """Put the legend in horizontal rows below the plot, in columns as wide as the longest entry;
    returns the new figure height (the plot keeps ``height``; the legend rows are added to it).
    ``width`` None: assume the ~650 px of a narrow notebook cell."""
    names = [str(n) for n in names]
    longest = max((len(n) for n in names), default=4)
    entry = 40 + 7 * longest
    per_row = max(1, ((width or 650) - 40) // entry)
    rows = math.ceil(len(names) / per_row)
    legend_h = 10 + 21 * rows
    bottom = plot_bottom + legend_h
    fig.update_layout(
        legend=dict(orientation="h", x=0, xanchor="left", y=0, yanchor="bottom", yref="container",
                    entrywidth=entry, entrywidthmode="pixels", title=dict(text="")),
        margin=dict(b=bottom))
    return height + legend_h


# ------------------------------------------------------------------------------------------------
# embedding scatter
# ------------------------------------------------------------------------------------------------
def embedding_scatter(df: pd.DataFrame, color: str | None = "label", symbol: str | None = "source",
                      title: str | None = None, hover: Sequence[str] | None = None,
                      class_names=None, webgl_threshold: int = 1000, selected=None,
                      marker_size: float | None = None, height: int = 520,
                      width: int | None = None):
    """Scatter of a 2-D map (the DataFrame of :func:`kaviz.embed.embed`).

    One trace per (source, class): colour = ``color`` column (class), symbol = ``symbol`` column
    (source network); each trace's ``customdata`` is the ``index`` column (the sample index that
    links the same image across sources and maps), ``meta`` is ``{"source", "label"}``.
    Classes share a legend group (clicking a class hides it in every source); the sources get a
    second, horizontal legend of grey symbols (traces with ``meta["legend_only"]``, no points).
    Above ``webgl_threshold`` rows the traces are ``Scattergl``. Axes have equal scale (a map's
    distances mean the same in x and y). ``selected`` (sample indices) highlights those points and
    dims the rest (see :func:`highlight`). ``class_names``: sequence or mapping label -> name.
    More than ten classes: light-tier colours (see :func:`palette`) are outlined in their base hue,
    and more than 18 put the class legend in rows below the map. ``width`` None (default): the
    figure fills its cell; otherwise it is capped at :data:`MAX_WIDTH`. :func:`map_title` builds a
    title naming the model, layer and method.
    """
    import plotly.graph_objects as go

    hover = _check_scatter_columns(df, color, symbol, hover)
    n = len(df)
    Trace = go.Scattergl if n > webgl_threshold else go.Scatter
    size = marker_size or (9 if n <= 500 else 7 if n <= 3000 else 5)
    sym_values = list(pd.unique(df[symbol])) if symbol is not None else [None]
    if len(sym_values) > len(SYMBOLS):
        raise ValueError(f"{len(sym_values)} values in {symbol!r} but only {len(SYMBOLS)} marker "
                         f"symbols; plot fewer sources at once")
    col_values, continuous = _color_levels(df, color)
    style_of = _class_styles(col_values)
    width = fit_width(width)

    fig = go.Figure()
    for si, s in enumerate(sym_values):
        for c, mask in _scatter_parts(df, color, symbol, s, col_values, continuous):
            fig.add_trace(_scatter_trace(Trace, df[mask], color, s, c, SYMBOLS[si], size, continuous,
                                         style_of, class_names, hover))
    _show_each_class_once(fig)
    many_sources = symbol is not None and len(sym_values) > 1 and not continuous
    if many_sources:
        _add_source_legend(fig, sym_values)
    n_classes = len(col_values) if not continuous else 0
    _scatter_layout(fig, df, color, symbol, title, height, width, many_sources, continuous,
                    [_class_name(c, class_names) for c in col_values] if n_classes > 18 else None)
    if selected is not None:
        highlight(fig, selected)
    return fig


def _check_scatter_columns(df, color, symbol, hover) -> list:
    need = ["x", "y", "index"] + [c for c in (color, symbol) if c is not None]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"embedding_scatter needs the columns {need} (as returned by "
                         f"kaviz.embed.embed); missing {missing}. Columns: {list(df.columns)}")
    hover = list(hover or [])
    bad = [c for c in hover if c not in df.columns]
    if bad:
        raise ValueError(f"hover columns {bad} are not in the DataFrame; columns: "
                         f"{list(df.columns)}")
    return hover


def _class_styles(col_values) -> dict:
    """Class level -> (fill colour, outline colour or None): palette order over the labelled
    levels, grey for the missing label, light-tier colours outlined in their base hue."""
    labelled = [v for v in col_values if v is not _NAN and v is not None]
    colors = palette(len(labelled))
    style = {}
    for i, v in enumerate(labelled):
        outline = _BASE10[i % len(_BASE10)] if palette_tier(i) > 0 and len(labelled) > 10 else None
        style[v] = (colors[i], outline)
    style[_NAN] = (_NO_LABEL_COLOR, None)
    style[None] = (_BASE10[0], None)
    return style


def _scatter_parts(df, color, symbol, s, col_values, continuous):
    """(class level, row mask) for the points of source ``s``, one per non-empty class."""
    smask = np.ones(len(df), bool) if symbol is None else (df[symbol] == s).to_numpy()
    for c in ([None] if continuous else col_values):
        if continuous or color is None:
            mask = smask
        elif c is _NAN:
            mask = smask & df[color].isna().to_numpy()
        else:
            mask = smask & (df[color] == c).to_numpy()
        if mask.any():
            yield c, mask


def _scatter_trace(Trace, part, color, s, c, symbol, size, continuous, style_of, class_names, hover):
    cname = "points" if color is None else (color if continuous else _class_name(c, class_names))
    src = "" if s is None else str(s)
    marker = dict(symbol=symbol, size=size, opacity=0.85, line=dict(width=0))
    if continuous:
        marker.update(color=part[color].to_numpy(dtype=float).round(4), coloraxis="coloraxis")
    else:
        fill, outline = style_of[c]
        marker["color"] = fill
        if outline:
            marker["line"] = dict(width=1.2, color=outline)
    lines = [f"<b>{_esc(cname)}</b>" if not continuous else "", _esc(src), "index %{customdata}"]
    text = None
    if hover:
        text = ["<br>".join(f"{h}: {_fmt(v)}" for h, v in zip(hover, row))
                for row in part[hover].itertuples(index=False)]
        lines.append("%{text}")
    return Trace(
        # rounded, then float32: plotly stores arrays as base64, 4 bytes a value
        x=part["x"].to_numpy(dtype=float).round(3).astype(np.float32),
        y=part["y"].to_numpy(dtype=float).round(3).astype(np.float32),
        mode="markers", name=cname if not continuous else src,
        legendgroup=f"class:{cname}" if not continuous else f"source:{src}",
        showlegend=continuous,  # class entries: set once per class by _show_each_class_once
        customdata=part["index"].to_numpy(dtype=np.int64), text=text,
        marker=marker, meta={"source": _py(s), "label": _py(c), "opacity": marker["opacity"]},
        hovertemplate="<br>".join(x for x in lines if x) + "<extra></extra>")


def _show_each_class_once(fig):
    """The class legend lists each class once (the first trace of its legend group); with a
    continuous colour the sources are listed only when there are several."""
    groups = [tr.legendgroup for tr in fig.data]
    if all(g.startswith("source:") for g in groups):
        if len(groups) == 1:
            fig.data[0].showlegend = False
        return
    seen = set()
    for tr in fig.data:
        tr.showlegend = tr.legendgroup not in seen
        seen.add(tr.legendgroup)


def _add_source_legend(fig, sym_values):
    import plotly.graph_objects as go

    for si, s in enumerate(sym_values):
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=str(s), legend="legend2",
            legendgroup=f"source:{s}", hoverinfo="skip", meta={"legend_only": True},
            marker=dict(symbol=SYMBOLS[si], size=10, color="#444444")))


def _scatter_layout(fig, df, color, symbol, title, height, width, many_sources, continuous,
                    wrapped_names):
    method = df.attrs.get("method")
    axis_name = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PC"}.get(method, "dim")
    legend = dict(itemsizing="constant", font=dict(size=11), tracegroupgap=0,
                  title=dict(text=str(color) if color else ""))
    fig.update_layout(
        template="plotly_white", height=height, width=width, title=title, legend=legend,
        margin=dict(l=10, r=10, t=60 if (title or many_sources) else 20, b=10),
        xaxis=dict(title=f"{axis_name} 1" if not wrapped_names else None, showticklabels=False,
                   zeroline=False),
        yaxis=dict(title=f"{axis_name} 2" if not wrapped_names else None, showticklabels=False,
                   zeroline=False, scaleanchor="x", scaleratio=1),
        dragmode="lasso", hoverlabel=dict(namelength=-1))
    if wrapped_names:
        # a long vertical legend would be clipped in static exports: wrap it below the map
        fig.update_layout(height=_legend_below(fig, wrapped_names, width, height, plot_bottom=10))
    if many_sources:
        fig.update_layout(legend2=dict(orientation="h", x=1, xanchor="right", y=1.0,
                                       yanchor="bottom", font=dict(size=11), title=dict(
                                           text=str(symbol))))
    if continuous:
        fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar=dict(title=color)))


def highlight(fig, indices=None, *, dim: float = 0.12, clear_boxes: bool = True):
    """Highlight the points whose ``customdata`` (sample index) is in ``indices`` in every trace
    of ``fig`` (a ``go.Figure`` or ``go.FigureWidget``, changed in place and returned): they are
    drawn opaque, the other points dimmed to opacity ``dim``. ``indices=None`` clears the
    highlight (every point back to its trace's opacity).

    The highlight is per-point ``marker.opacity``, not plotly's ``selectedpoints``: plotly.js
    owns ``selectedpoints`` while a box or lasso is drawn in a browser and resets it when the box
    goes, at a moment of its own, which would wipe a highlight kept there (measured with
    tests/browser; docs/decisions.md). A trace's own opacity is kept in ``meta["opacity"]`` so
    that clearing restores it.

    ``clear_boxes`` (default) also removes the boxes and lassos drawn on the figure
    (``layout.selections``) and plotly's own selection: plotly re-applies a drawn box to whatever
    lies inside it, so a box kept after a recompute or next to a selection made in another map
    would show other points than ``indices``."""
    keep = None if indices is None else np.asarray(
        sorted({int(i) for i in np.asarray(list(indices)).ravel()}), dtype=np.int64)
    with fig.batch_update():  # one message to the browser for a FigureWidget
        # Only boxes the Python side knows of: a box drawn in a browser is not synced back to a
        # FigureWidget (kaviz.widgets clears those itself).
        if clear_boxes and fig.layout.selections:
            fig.layout.selections = ()
        for tr in fig.data:
            meta = tr.meta if isinstance(tr.meta, dict) else None
            if meta and meta.get("legend_only"):
                continue
            cd = tr.customdata
            if cd is None:
                continue
            base = base_opacity(tr)
            if meta is not None and meta.get("opacity") != base:
                tr.meta = {**meta, "opacity": base}
            elif tr.meta is None:
                tr.meta = {"opacity": base}
            if clear_boxes and tr.selectedpoints is not None:
                tr.selectedpoints = None
            if keep is None:
                tr.marker.opacity = base
            else:
                cd = np.asarray(cd).reshape(len(cd), -1)[:, 0].astype(np.int64)
                tr.marker.opacity = np.where(np.isin(cd, keep), 1.0, float(dim)).astype(np.float32)
    return fig


def base_opacity(trace) -> float:
    """A trace's own marker opacity: ``meta["opacity"]`` once :func:`highlight` has seen it,
    else its scalar ``marker.opacity`` (1 when unset or already per-point)."""
    meta = trace.meta if isinstance(trace.meta, dict) else {}
    if meta.get("opacity") is not None:
        return float(meta["opacity"])
    op = trace.marker.opacity
    return float(op) if op is not None and np.ndim(op) == 0 else 1.0


def highlighted(fig) -> set[int] | None:
    """The sample indices :func:`highlight` shows opaque in ``fig`` (every trace), or None when
    nothing is highlighted (no trace has per-point opacities)."""
    out, any_ = set(), False
    for tr in fig.data:
        op = tr.marker.opacity
        if tr.customdata is None or op is None or np.ndim(op) == 0:
            continue
        any_ = True
        cd = np.asarray(tr.customdata).reshape(len(tr.customdata), -1)[:, 0]
        out.update(int(i) for i in cd[np.asarray(op, dtype=float) >= 1.0])
    return out if any_ else None


class _Nan:
    def __repr__(self):
        return "NaN"


_NAN = _Nan()


def _color_levels(df, color):
    """Category levels of the colour column (sorted; missing values last as ``_NAN``), or
    ``(None, True)`` for a many-valued float column drawn with a continuous scale."""
    if color is None:
        return [None], False
    col = df[color]
    notna = col.dropna()
    if (pd.api.types.is_float_dtype(col) and notna.nunique() > 40
            and not np.all(np.mod(notna.to_numpy(), 1) == 0)):
        return [None], True
    try:
        levels = sorted(pd.unique(notna))
    except TypeError:
        levels = list(pd.unique(notna))
    if len(notna) < len(col):
        levels.append(_NAN)
    return levels, False


def class_name(c, class_names=None) -> str:
    """The display name of class label ``c``: ``class_names`` is a sequence (indexed by an integer
    label), a mapping label -> name, a callable, or None (the label itself, ``3.0`` shown as
    ``3``); a missing label (the NaN level of :func:`embedding_scatter`) is ``"no label"``."""
    if c is _NAN:
        return "no label"
    if class_names is not None:
        if callable(class_names):
            return str(class_names(c))
        if isinstance(class_names, Mapping):
            return str(class_names.get(c, class_names.get(_py(c), c)))
        try:
            if float(c).is_integer() and 0 <= int(c) < len(class_names):
                return str(class_names[int(c)])
        except (TypeError, ValueError):
            pass
    if isinstance(c, (float, np.floating)) and float(c).is_integer():
        c = int(c)
    return str(c)


_class_name = class_name  # the name plots' own callers use


def _py(v):
    if v is _NAN or v is None:
        return None
    return v.item() if isinstance(v, np.generic) else v


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return _esc(str(v))


def _esc(s):
    return str(s).replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------------------
# training curves
# ------------------------------------------------------------------------------------------------
def training_curves(history, terms: Sequence[str] | None = None,
                    metrics: Sequence[str] | None = None, title: str | None = None):
    """Loss terms and metrics per epoch.

    ``history``: a DataFrame with one row per epoch — ``epoch``, loss terms as ``train/<term>``
    (and optionally ``val/<term>``), metrics as ``val/<metric>`` (``train/``/``test/`` too), ``lr``
    — or a dict ``run name -> history`` to overlay runs. A name is a metric if it only appears
    under ``val/``/``test/`` or looks like one (accuracy, mAP, IoU, ...); every other ``train/``
    name is a loss term. ``terms``/``metrics`` override the choice. ``history.attrs["best_epoch"]``
    is marked with a vertical dotted line.

    One run: a panel of loss terms (colour = term,
    solid = train, dashed = val), a panel of metrics, and a learning-rate panel when it changes.
    Several runs: one panel per term and per metric, colour = run, dash = split.
    A term equal to another in every run and split (a single-term method's ``loss`` is its ``ce``)
    is drawn once, named ``"loss = ce"``. Loss axes are logarithmic when every value is positive and
    they span at least a decade. The figure is at most :data:`MAX_WIDTH` px wide; the legend sits
    in rows below the panels.
    """
    runs = _as_runs(history)
    found_terms, found_metrics = [], []
    for h in runs.values():
        t, m = _split_columns(h)
        found_terms += [x for x in t if x not in found_terms]
        found_metrics += [x for x in m if x not in found_metrics]
    if not found_terms and not found_metrics:
        cols = sorted({c for h in runs.values() for c in h.columns})
        raise ValueError(f"no 'train/<term>' or 'val/<metric>' columns in the history (columns: "
                         f"{cols}); expected e.g. epoch, train/kd, val/kd, val/accuracy, lr")
    terms = _pick(terms, found_terms, "terms")
    metrics = _pick(metrics, found_metrics, "metrics")
    terms, aliases = _merge_identical_terms(runs, terms)
    if len(runs) > 1 or next(iter(runs)) is not None:
        return _overlay_curves(runs, terms, metrics, aliases, title)
    return _single_run_curves(next(iter(runs.values())), terms, metrics, aliases, title)


def _merge_identical_terms(runs: Mapping, terms: Sequence[str]) -> tuple[list[str], dict]:
    """Drop a term whose columns equal an earlier term's in every run and split; returns the kept
    terms and ``{kept term: display name}`` (``"loss = ce"``) for the ones that absorbed others."""
    kept, aliases = [], {}
    for t in terms:
        twin = next((k for k in kept if _same_series(runs, k, t)), None)
        if twin is None:
            kept.append(t)
        else:
            aliases[twin] = f"{aliases.get(twin, twin)} = {t}"
    return kept, aliases


def _same_series(runs, a, b) -> bool:
    found = False
    for h in runs.values():
        for sp in _SPLITS:
            ca, cb = f"{sp}/{a}", f"{sp}/{b}"
            if (ca in h.columns) != (cb in h.columns):
                return False
            if ca in h.columns:
                x, y = h[ca].to_numpy(dtype=float), h[cb].to_numpy(dtype=float)
                if not np.allclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True):
                    return False
                found = True
    return found


def _single_run_curves(h, terms, metrics, aliases, title):
    """One run: loss terms | metrics | learning rate (when it changes), colour = term."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = []
    if terms:
        panels.append(("loss terms", [(t, s) for t in terms for s in _SPLITS if f"{s}/{t}" in h.columns]))
    if metrics:
        panels.append(("metrics", [(m, s) for m in metrics for s in _SPLITS if f"{s}/{m}" in h.columns]))
    if "lr" in h.columns and h["lr"].nunique(dropna=True) > 1:
        panels.append(("learning rate", [("lr", None)]))
    cols = len(panels)
    fig = make_subplots(rows=1, cols=cols, subplot_titles=[p[0] for p in panels], horizontal_spacing=0.08)
    x = _epochs(h)
    all_names = [*terms, *metrics]
    colors = dict(zip(all_names, palette(len(all_names))))
    legend_names = []
    for pi, (pname, series) in enumerate(panels, start=1):
        values = []
        for name, split in series:
            y = h[name if split is None else f"{split}/{name}"].to_numpy(dtype=float)
            values.append(y)
            shown = aliases.get(name, name)
            label = shown if split is None else f"{shown} ({split})"
            if pname != "learning rate":
                legend_names.append(label)
            fig.add_trace(go.Scatter(
                x=x, y=np.round(y, 6), mode="lines+markers" if len(x) <= 30 else "lines",
                name=label, legendgroup=name, showlegend=pname != "learning rate",
                line=dict(color=colors[name] if split else "#555555",
                          dash=_SPLIT_DASH.get(split, "solid"), width=2),
                marker=dict(size=6),
                hovertemplate=f"{_esc(label)}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>"),
                row=1, col=pi)
        if pname in ("loss terms", "learning rate") and _wants_log(values):
            fig.update_yaxes(type="log", dtick="D2", tickformat=".2~g", row=1, col=pi)
        if pname == "learning rate":
            fig.update_yaxes(exponentformat="e", row=1, col=pi)
    _mark_best_epoch(fig, h.attrs.get("best_epoch") if hasattr(h, "attrs") else None, cols)
    width = fit_width(340 * cols + 120)
    fig.update_layout(template="plotly_white", width=width, title=title,
                      margin=dict(l=50, r=10, t=70 if title else 40))
    fig.update_layout(height=_legend_below(fig, legend_names, width, 340, plot_bottom=50))
    fig.update_xaxes(title_text="epoch", **_epoch_ticks({None: h}))
    return fig


def _mark_best_epoch(fig, best, cols):
    if best is None:
        return
    for pi in range(1, cols + 1):
        fig.add_vline(x=best, line=dict(color="#888888", dash="dot", width=1.5), row=1, col=pi)
    fig.add_annotation(x=best, y=0.02, yref="y domain", xref="x", text=f"best: {best}",
                       showarrow=False, xanchor="right", yanchor="bottom", xshift=-3,
                       font=dict(size=10, color="#666666"), bgcolor="rgba(255,255,255,.7)")


def _overlay_curves(runs, terms, metrics, aliases, title):
    """Several runs: one panel per term and metric (three a row), colour = run, dash = split."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [*terms, *metrics]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[aliases.get(n, n) for n in names],
                        horizontal_spacing=0.07, vertical_spacing=0.14 if rows > 1 else 0.1)
    run_colors = dict(zip(runs, palette(len(runs))))
    shown, legend_names = set(), []
    for k, name in enumerate(names):
        r, c = divmod(k, cols)
        values = []
        for run, h in runs.items():
            x = _epochs(h)
            for split in _SPLITS:
                col = f"{split}/{name}"
                if col not in h.columns:
                    continue
                y = h[col].to_numpy(dtype=float)
                values.append(y)
                key = (run, split)
                if key not in shown:
                    legend_names.append(f"{run} ({split})")
                fig.add_trace(go.Scatter(
                    x=x, y=np.round(y, 6), mode="lines+markers" if len(x) <= 30 else "lines",
                    name=f"{run} ({split})", legendgroup=f"{run}/{split}", showlegend=key not in shown,
                    line=dict(color=run_colors[run], dash=_SPLIT_DASH[split], width=2),
                    marker=dict(size=5),
                    hovertemplate=f"{_esc(run)} {split}/{_esc(name)}<br>epoch %{{x}}: "
                                  f"%{{y:.4g}}<extra></extra>"),
                    row=r + 1, col=c + 1)
                shown.add(key)
            best = h.attrs.get("best_epoch")
            if best is not None and any(f"{sp}/{name}" in h.columns for sp in _SPLITS):
                fig.add_vline(x=best, line=dict(color=run_colors[run], dash="dot", width=1.2),
                              row=r + 1, col=c + 1)
        if name in terms and _wants_log(values):
            fig.update_yaxes(type="log", dtick="D2", tickformat=".2~g", row=r + 1, col=c + 1)
    width = fit_width(330 * cols + 120)
    fig.update_layout(template="plotly_white", width=width, title=title,
                      margin=dict(l=50, r=10, t=70 if title else 40))
    fig.update_layout(height=_legend_below(fig, legend_names, width, 300 * rows + 60, plot_bottom=50))
    fig.update_xaxes(title_text="epoch", row=rows)
    fig.update_xaxes(**_epoch_ticks(runs))
    return fig


def _epoch_ticks(runs: Mapping) -> dict:
    """Whole epochs only: with few epochs plotly would otherwise label 1.5, 2.5, ..."""
    last = max((float(np.nanmax(_epochs(h))) for h in runs.values() if len(h)), default=0.0)
    return {"dtick": 1} if last <= 12 else {}


def _as_runs(history) -> dict:
    if isinstance(history, pd.DataFrame):
        return {None: history}
    if isinstance(history, Mapping):
        if not history:
            raise ValueError("history is an empty dict; pass {run name: history DataFrame}")
        bad = [k for k, v in history.items() if not isinstance(v, pd.DataFrame)]
        if bad:
            raise TypeError(f"history values must be DataFrames; not for runs {bad}")
        return {str(k): v for k, v in history.items()}
    raise TypeError(f"history must be a DataFrame (one row per epoch) or a dict of them, got "
                    f"{type(history).__name__}")


def _split_columns(h):
    by_split = {s: [c.split("/", 1)[1] for c in h.columns
                    if isinstance(c, str) and c.startswith(s + "/")] for s in _SPLITS}
    train = by_split["train"]
    names = list(dict.fromkeys([*train, *by_split["val"], *by_split["test"]]))
    metrics = [n for n in names if n not in train or _METRIC_RE.search(n)]
    terms = [n for n in names if n not in metrics]
    return terms, metrics


def _pick(wanted, found, what):
    if wanted is None:
        return list(found)
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [w for w in wanted if w not in found]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the history has {what}: {found}")
    return wanted


def _epochs(h):
    if "epoch" in h.columns:
        return h["epoch"].to_numpy()
    return np.arange(1, len(h) + 1)


def _wants_log(values):
    """Log scale when every value is positive and they span at least a decade (below that a log
    axis has one or two tick labels and reads worse than a linear one)."""
    vals = [v[np.isfinite(v)] for v in values]
    vals = np.concatenate([v for v in vals if v.size]) if any(v.size for v in vals) else None
    return vals is not None and bool((vals > 0).all()) and vals.max() >= 10 * vals.min()


# ------------------------------------------------------------------------------------------------
# grids of maps and images
# ------------------------------------------------------------------------------------------------
def heat_scale(values, symmetric: bool = True, diverging: str = "RdBu_r",
               positive: str = "Reds", negative: str = "Blues_r") -> tuple[str, float, float]:
    """The colour scale and range for heat maps of ``values`` (an array or a list of them):
    a diverging scale ``[-m, m]`` (``m`` = max ``|value|``, white at 0) only when the values have
    both signs; otherwise a sequential scale from 0 (white) to the largest value — or from the
    smallest value to 0 when all are ≤ 0. ``symmetric=False``: Viridis over min..max."""
    arrs = [np.asarray(v, dtype=np.float64).ravel() for v in (values if isinstance(values, (list, tuple))
                                                               else [values])]
    v = np.concatenate(arrs) if arrs else np.zeros(1)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    if not symmetric:
        return "Viridis", lo, (hi if hi > lo else lo + 1.0)
    if lo < 0 < hi:
        m = max(-lo, hi)
        return diverging, -m, m
    if hi > 0:
        return positive, 0.0, hi
    if lo < 0:
        return negative, lo, 0.0
    return positive, 0.0, 1.0  # all zero


def feature_grid(maps, titles=None, row_titles=None, symmetric: str | None = "row",
                 colorscale: str = "RdBu_r", cell: int = 120, shared: bool = False):
    """A grid of 2-D maps, every scale with a colour bar.

    ``maps``: a list of rows, each a list of ``(H, W)`` arrays (numpy or torch), ``None`` (an
    empty cell), or RGB images (``uint8 (H, W, 3)``, drawn as images); or an array
    ``(R, C, H, W)``. ``titles``: one per column (a flat list) or per cell (list of lists).
    ``symmetric`` says which maps share a colour scale: ``"row"`` (one per row), ``"map"`` (one per
    map), ``"global"`` (one for all; ``shared=True`` is the same) or ``None`` (one per map, Viridis
    over its min..max). Within a scale the colours follow :func:`heat_scale`: the diverging
    ``colorscale`` symmetric about 0 only when the values have both signs, else a sequential scale
    from 0 (post-ReLU maps are all ≥ 0). Every scale gets a colour bar (per row: right of the row;
    per map: right of the map). The figure is at most :data:`MAX_WIDTH` px wide (cells shrink).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if symmetric not in ("row", "map", "global", None):
        raise ValueError(f"symmetric must be 'row', 'map', 'global' or None, got {symmetric!r}")
    if shared:
        symmetric = "global"
    grid = _as_grid(maps)
    R, C = len(grid), max(len(r) for r in grid)
    cell_titles = _cell_titles(titles, R, C)
    if row_titles is not None and len(row_titles) != R:
        raise ValueError(f"row_titles has {len(row_titles)} entries for {R} rows")
    has_heat = any(a is not None and a.ndim == 2 for row in grid for a in row)
    per_map = symmetric in ("map", None) and has_heat
    bar_px = 46 if per_map else 0            # room right of every map for its colour bar
    right = 0 if per_map else (80 if row_titles else 60) if has_heat else (30 if row_titles else 0)
    cell = min(cell, (MAX_WIDTH - 40 - right) // C - bar_px)
    width = int((cell + bar_px) * C + 40 + right)
    fig = make_subplots(rows=R, cols=C, subplot_titles=[t or "" for r in cell_titles for t in r],
                        row_titles=list(row_titles) if row_titles is not None else None,
                        horizontal_spacing=(bar_px + 8) / width if per_map else 0.02,
                        vertical_spacing=0.06 if R > 1 else 0.02)
    scales = _grid_scales(grid, symmetric, colorscale)
    for r, row in enumerate(grid):
        for c in range(C):
            a = row[c] if c < len(row) else None
            if a is None:
                continue
            if a.ndim == 3:
                fig.add_trace(go.Image(source=_png_uri(to_rgb_uint8(a)), hoverinfo="skip"),
                              row=r + 1, col=c + 1)
            else:
                fig.add_trace(go.Heatmap(
                    z=np.asarray(a, dtype=np.float32), coloraxis=scales[(r, c)],
                    hovertemplate="(%{y}, %{x}): %{z:.3g}<extra></extra>"), row=r + 1, col=c + 1)
            fig.update_xaxes(visible=False, row=r + 1, col=c + 1)
            fig.update_yaxes(visible=False, autorange="reversed", scaleanchor=_anchor(fig, r, c),
                             scaleratio=1, row=r + 1, col=c + 1)
    height = int(cell * R + 60 + (30 if any(t for rr in cell_titles for t in rr) else 0))
    fig.update_layout(template="plotly_white", height=height, width=width,
                      **_grid_coloraxes(fig, scales, grid, symmetric, bool(row_titles), colorscale),
                      margin=dict(l=10, r=right + 10, t=40, b=10), plot_bgcolor="white")
    fig.update_annotations(font_size=11)
    return fig


def _grid_scales(grid, symmetric, colorscale) -> dict:
    """(row, col) of every scalar map -> the name of its colour axis."""
    out = {}
    for r, row in enumerate(grid):
        for c, a in enumerate(row):
            if a is None or a.ndim == 3:
                continue
            k = 0 if symmetric == "global" else r if symmetric == "row" else len(out)
            out[(r, c)] = f"coloraxis{_axis_no(k)}"
    return out


def _grid_coloraxes(fig, scales, grid, symmetric, has_row_titles, colorscale) -> dict:
    """The layout's colour axes: scale and range per :func:`heat_scale`, a colour bar each."""
    members = {}
    for (r, c), ca in scales.items():
        members.setdefault(ca, []).append((r, c))
    layout = {}
    for ca, cells in members.items():
        name, lo, hi = heat_scale([grid[r][c] for r, c in cells], symmetric=symmetric is not None,
                                  diverging=colorscale)
        bar = dict(thickness=10, tickfont=dict(size=9), tickformat=".2~g", outlinewidth=0)
        r, c = cells[0]
        if symmetric in ("map", None):
            sub = fig.get_subplot(r + 1, c + 1)
            xd, yd = sub.xaxis.domain, sub.yaxis.domain
            bar.update(x=xd[1] + 0.004, xanchor="left", y=(yd[0] + yd[1]) / 2, len=(yd[1] - yd[0]),
                       thickness=8)
        elif symmetric == "row":
            yd = fig.get_subplot(r + 1, 1).yaxis.domain
            bar.update(y=(yd[0] + yd[1]) / 2, len=(yd[1] - yd[0]) * 0.95,
                       x=1.0 + (0.06 if has_row_titles else 0.01))
        layout[ca] = dict(cmin=lo, cmax=hi, colorscale=name, showscale=True, colorbar=bar)
    return layout


def _axis_no(k):
    return "" if k == 0 else str(k + 1)


def _anchor(fig, r, c):
    return fig.get_subplot(r + 1, c + 1).xaxis.plotly_name.replace("axis", "")


def _as_grid(maps):
    if type(maps).__module__.split(".")[0] == "torch":
        maps = maps.detach().cpu().numpy()
    if isinstance(maps, np.ndarray):
        if maps.ndim != 4:
            raise ValueError(f"maps array must be (rows, cols, H, W), got shape {maps.shape}")
        return [[maps[r, c] for c in range(maps.shape[1])] for r in range(maps.shape[0])]
    if not isinstance(maps, Sequence) or not maps:
        raise TypeError("maps must be a non-empty list of rows (lists of (H, W) arrays) or an "
                        "array (R, C, H, W)")
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in maps]
    out = []
    for ri, row in enumerate(rows):
        new = []
        for ci, a in enumerate(row):
            if a is None:
                new.append(None)
                continue
            if type(a).__module__.split(".")[0] == "torch":
                a = a.detach().cpu().numpy()
            a = np.asarray(a)
            if a.ndim == 3 and a.shape[-1] in (3, 4):
                new.append(to_rgb_uint8(a))
            elif a.ndim == 2:
                new.append(a.astype(np.float32))
            else:
                raise ValueError(f"maps[{ri}][{ci}] has shape {a.shape}; expected (H, W) or an "
                                 f"RGB image (H, W, 3)")
        out.append(new)
    return out


def _cell_titles(titles, R, C):
    if titles is None:
        return [[None] * C for _ in range(R)]
    titles = list(titles)
    if titles and all(isinstance(t, (list, tuple)) for t in titles):
        if len(titles) != R:
            raise ValueError(f"titles has {len(titles)} rows for {R} rows of maps")
        return [list(t) + [None] * (C - len(t)) for t in titles]
    if len(titles) != C:
        raise ValueError(f"titles has {len(titles)} entries for {C} columns (give one per "
                         f"column, or a list of lists, one per cell)")
    return [titles if r == 0 else [None] * C for r in range(R)]


def to_rgb_uint8(img) -> np.ndarray:
    """An image as ``uint8 (H, W, 3)``: accepts uint8 or float in [0, 1], ``(H, W)`` grey,
    ``(H, W, 3|4)`` or channel-first ``(1|3, H, W)`` (numpy or torch)."""
    if type(img).__module__.split(".")[0] == "torch":
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image (H, W), (H, W, 3) or (3, H, W), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if np.nanmax(a) > 1.0 + 1e-6 or np.nanmin(a) < -1e-6:
            raise ValueError(f"float images must be in [0, 1] (got range {np.nanmin(a):.3g}.."
                             f"{np.nanmax(a):.3g}); pass uint8 for 0..255")
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def png_bytes(img, size: int | None = None) -> bytes:
    """PNG bytes of an image (see :func:`to_rgb_uint8`), upscaled with nearest neighbour so that
    its longer side is about ``size`` pixels (never downscaled)."""
    from PIL import Image

    a = to_rgb_uint8(img)
    im = Image.fromarray(a)
    if size:
        f = max(1, int(round(size / max(a.shape[:2]))))
        if f > 1:
            im = im.resize((a.shape[1] * f, a.shape[0] * f), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _png_uri(a):
    return "data:image/png;base64," + base64.b64encode(png_bytes(a)).decode()


def image_grid(images, titles=None, cols: int = 8, cell: int = 96):
    """Images (a list, or an array ``(N, H, W, 3)`` / ``(N, 3, H, W)``, uint8 or float in [0, 1])
    in a grid of ``cols`` columns, with optional titles."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if type(images).__module__.split(".")[0] == "torch":
        images = images.detach().cpu().numpy()
    imgs = [to_rgb_uint8(im) for im in images]
    if not imgs:
        raise ValueError("image_grid got no images")
    if titles is not None and len(titles) != len(imgs):
        raise ValueError(f"{len(titles)} titles for {len(imgs)} images")
    cols = max(1, min(cols, len(imgs)))
    rows = math.ceil(len(imgs) / cols)
    cell = min(cell, (MAX_WIDTH - 20) // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.01,
                        vertical_spacing=0.08 if titles is not None else 0.01,
                        subplot_titles=[str(t) for t in titles] if titles is not None else None)
    for k, im in enumerate(imgs):
        fig.add_trace(go.Image(source=_png_uri(im), hoverinfo="skip"),
                      row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    extra = 22 if titles is not None else 0
    fig.update_layout(template="plotly_white", width=cols * cell + 20,
                      height=rows * (cell + extra) + 20, margin=dict(l=5, r=5, t=25, b=5))
    fig.update_annotations(font_size=10)
    return fig


def bar(data, x: str | None = None, y: str | None = None, error: str | None = None,
        color: str | None = None, title: str | None = None, ylabel: str | None = None):
    """A bar chart of a Series (index -> value) or of DataFrame columns ``x``/``y`` with an
    optional ``error`` column (± error bars, e.g. std over seeds) and a ``color`` column for
    grouped bars. Values are shown on the bars, rounded to 3 significant digits."""
    import plotly.graph_objects as go

    if isinstance(data, pd.Series):
        df = pd.DataFrame({"x": data.index.astype(str), "y": data.to_numpy()})
        x, y, ylabel = "x", "y", ylabel or data.name
    elif isinstance(data, pd.DataFrame):
        df = data
        for name, col in (("x", x), ("y", y), ("error", error), ("color", color)):
            if col is not None and col not in df.columns:
                raise ValueError(f"{name}={col!r} is not a column; columns: {list(df.columns)}")
        if x is None or y is None:
            raise ValueError("bar(DataFrame) needs x= and y= column names")
    else:
        raise TypeError(f"bar takes a pandas Series or DataFrame, got {type(data).__name__}")
    groups = [None] if color is None else list(pd.unique(df[color]))
    colors = palette(len(groups))
    fig = go.Figure()
    for g, col in zip(groups, colors):
        part = df if g is None else df[df[color] == g]
        vals = part[y].to_numpy(dtype=float)
        err = None if error is None else dict(type="data",
                                               array=part[error].to_numpy(dtype=float).round(6))
        fig.add_trace(go.Bar(x=part[x].astype(str), y=vals.round(6), error_y=err,
                             name=str(g) if g is not None else str(y), marker_color=col,
                             text=[f"{v:.3g}" for v in vals], textposition="outside",
                             showlegend=g is not None))
    fig.update_layout(template="plotly_white", title=title, barmode="group", height=360,
                      yaxis_title=ylabel or (y if y not in (None, "y") else None),
                      margin=dict(l=50, r=10, t=60 if title else 30, b=40))
    if len(groups) > 6:
        fig.update_layout(height=_legend_below(fig, [str(g) for g in groups], None, 360, plot_bottom=60))
    return fig


# ------------------------------------------------------------------------------------------------
# dense predictions (segmentation masks, depth maps) — added for the dense papers (SBM, §4.2)
# ------------------------------------------------------------------------------------------------
def _hex_rgb(c: str) -> tuple[int, int, int]:
    c = c.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _color_rgb(c) -> tuple[int, int, int]:
    if isinstance(c, str) and c.startswith("#") and len(c) == 7:
        return _hex_rgb(c)
    if isinstance(c, str) and c.startswith("rgb"):
        vals = re.findall(r"[\d.]+", c)[:3]
        return tuple(int(round(float(v))) for v in vals)
    if isinstance(c, (tuple, list)) and len(c) == 3:
        return tuple(int(v) for v in c)
    raise ValueError(f"colours must be '#RRGGBB', 'rgb(r, g, b)' or (r, g, b), got {c!r}")


def label_image(labels, num_classes: int, colors=None, ignore_index: int = 255,
                ignore_color="#FFFFFF") -> np.ndarray:
    """A class-id map ``(H, W)`` as an RGB image ``uint8 (H, W, 3)``: class k in ``colors[k]``
    (default :func:`palette`), ``ignore_index`` pixels in ``ignore_color``."""
    if type(labels).__module__.split(".")[0] == "torch":
        labels = labels.detach().cpu().numpy()
    a = np.asarray(labels)
    if a.ndim != 2:
        raise ValueError(f"label_image takes one (H, W) map of class ids, got shape {a.shape}")
    colors = list(colors) if colors is not None else palette(num_classes)
    if len(colors) < num_classes:
        raise ValueError(f"{len(colors)} colours for {num_classes} classes")
    lut = np.array([_color_rgb(c) for c in colors[:num_classes]] + [_color_rgb(ignore_color)], dtype=np.uint8)
    a = a.astype(np.int64)
    bad = (a != ignore_index) & ((a < 0) | (a >= num_classes))
    if bad.any():
        raise ValueError(f"class ids must lie in [0, {num_classes}) or be {ignore_index} (ignored), "
                         f"got {np.unique(a[bad])[:5].tolist()}")
    return lut[np.where(a == ignore_index, num_classes, a)]


def scalar_image(values, vmin: float | None = None, vmax: float | None = None,
                 colorscale: str = "Viridis") -> np.ndarray:
    """A scalar map ``(H, W)`` (depth, error) as an RGB image ``uint8 (H, W, 3)`` on a plotly
    colour scale over ``[vmin, vmax]`` (default: the map's finite range); NaN pixels are white."""
    from plotly.colors import sample_colorscale

    if type(values).__module__.split(".")[0] == "torch":
        values = values.detach().cpu().numpy()
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"scalar_image takes one (H, W) map, got shape {a.shape}")
    finite = np.isfinite(a)
    lo = float(np.min(a[finite])) if vmin is None and finite.any() else (vmin if vmin is not None else 0.0)
    hi = float(np.max(a[finite])) if vmax is None and finite.any() else (vmax if vmax is not None else 1.0)
    lut = np.array([_color_rgb(c) for c in sample_colorscale(colorscale, list(np.linspace(0, 1, 256)))],
                   dtype=np.uint8)
    t = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    out = lut[np.round(np.nan_to_num(t) * 255).astype(np.int64)]
    out[~finite] = 255
    return out


def dense_predictions(image, rows: Mapping[str, Mapping[str, object]], kinds: Mapping[str, str],
                      class_names: Sequence[str] | None = None, class_colors=None,
                      value_range: tuple[float, float] | None = None, value_title: str = "depth",
                      colorscale: str = "Viridis", ignore_index: int = 255, cell: int = 120,
                      title: str | None = None, num_classes: int | None = None, background: int | None = None):
    """The one dense-panel builder: input image and dense maps side by side, one row per task and
    one column per source (SBM's segmentation and depth, recombination's reconstructions and
    segmentation).

    ``rows``: ``{task: {column: map}}`` (e.g. ``{"segmentation": {"ground truth": m, "teacher": t,
    "student": s}, "depth": {...}}``); ``kinds``: ``{task: "labels" | "scalar" | "rgb"}``.
    The input image (``None``: no input column) opens the first row. ``labels``: integer ``(H, W)``
    class-id maps, one colour per class in every panel (``class_colors``, default :func:`palette`
    of ``num_classes`` — else of ``len(class_names)``, else of the largest id + 1), the
    ``background`` class (if given) near-black, ``ignore_index`` white, with a legend of the classes
    that appear. ``scalar``: one shared range per row (``value_range``, default the row's finite
    min..max) with a colour bar. ``rgb``: images (``(H, W, 3)`` or ``(3, H, W)``, float in [0, 1] or
    uint8 — reconstructions) drawn as they are.
    """
    if not rows:
        raise ValueError("rows is empty: give {task: {column: map}}")
    unknown = [t for t in rows if kinds.get(t) not in _DENSE_KINDS]
    if unknown:
        raise ValueError(f"kinds must say {' | '.join(map(repr, _DENSE_KINDS))} for every row; "
                         f"missing/invalid for {unknown}")
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    lead = 1 if image is not None else 0
    cell = min(cell, (MAX_WIDTH - 330) // (len(columns) + lead))
    arrays = {task: {c: _as_array(m) for c, m in maps.items()} for task, maps in rows.items()}
    k = _dense_class_count(arrays, kinds, num_classes, class_names, ignore_index)
    colors = _dense_label_colors(k, class_colors, background) if k else None
    grid, titles, present, ranges = [], [], set(), {}
    for ri, (task, maps) in enumerate(arrays.items()):
        row = [to_rgb_uint8(image) if ri == 0 else None] if lead else []
        row_titles = ["input" if ri == 0 else None] if lead else []
        if kinds[task] == "labels":
            for a in maps.values():
                present.update(int(v) for v in np.unique(a) if v != ignore_index)
        elif kinds[task] == "scalar":
            vals = np.concatenate([a[np.isfinite(a)].ravel() for a in maps.values()])
            ranges[ri] = value_range if value_range is not None else (float(vals.min()), float(vals.max()))
        for c in columns:
            a = maps.get(c)
            row.append(None if a is None else _dense_panel(task, c, a, kinds[task], k, colors, ignore_index,
                                                           ranges.get(ri), colorscale))
            row_titles.append(f"{c}" if a is not None else None)
        grid.append(row)
        titles.append(row_titles)
    fig = feature_grid(grid, titles=titles, row_titles=list(rows), symmetric=None, cell=cell)
    _dense_legend(fig, present, colors, class_names)
    _dense_colorbars(fig, grid, ranges, colorscale, value_title)
    fig.update_layout(title=title, showlegend=bool(present),
                      legend=dict(x=1.0 + 0.16, y=1.0, font=dict(size=10), title=dict(text="class")),
                      width=int(cell * (len(columns) + lead) + 330), margin=dict(r=240, t=60 if title else 40))
    return fig


_DENSE_KINDS = ("labels", "scalar", "rgb")


def _as_array(m) -> np.ndarray:
    return m.detach().cpu().numpy() if type(m).__module__.split(".")[0] == "torch" else np.asarray(m)


def _dense_class_count(arrays, kinds, num_classes, class_names, ignore_index) -> int:
    """How many classes the label rows are coloured for (0 without label rows)."""
    labels = [a for task, maps in arrays.items() if kinds[task] == "labels" for a in maps.values()]
    if not labels:
        return 0
    if num_classes is not None:
        return int(num_classes)
    if class_names is not None:
        return len(class_names)
    return int(max(int(a[a != ignore_index].max(initial=0)) for a in labels) + 1)


def _dense_label_colors(k: int, class_colors, background) -> list:
    colors = list(class_colors) if class_colors is not None else palette(k)
    if background is not None and 0 <= background < len(colors):
        colors[background] = "#111111"
    return colors


def _dense_panel(task, column, a, kind, k, colors, ignore_index, value_range, colorscale) -> np.ndarray:
    """One map of ``rows[task][column]`` as an RGB image; errors name the panel."""
    where = f"rows[{task!r}][{column!r}]"
    if kind == "labels":
        if a.ndim != 2:
            raise ValueError(f"{where}: a 'labels' row takes (H, W) class-id maps, got shape {a.shape}")
        try:
            return label_image(a, k, colors, ignore_index)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if kind == "scalar":
        if a.ndim != 2:
            raise ValueError(f"{where}: a 'scalar' row takes (H, W) maps, got shape {a.shape}")
        return scalar_image(a, *value_range, colorscale=colorscale)
    if a.ndim != 3:
        raise ValueError(f"{where}: an 'rgb' row takes (H, W, 3) or (3, H, W) images, got shape {a.shape}")
    return to_rgb_uint8(a)


def _dense_legend(fig, present, colors, class_names) -> None:
    import plotly.graph_objects as go

    for c in sorted(present):
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                                 marker=dict(symbol="square", size=11, color=colors[c])), row=1, col=1)


def _dense_colorbars(fig, grid, ranges, colorscale, value_title) -> None:
    import plotly.graph_objects as go

    for ri, (lo, hi) in ranges.items():
        dom = fig.get_subplot(ri + 1, 1).yaxis.domain
        col = next(c for c, a in enumerate(grid[ri]) if a is not None) + 1  # an axis already hidden
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
            marker=dict(colorscale=colorscale, cmin=lo, cmax=hi, color=[lo], showscale=True,
                        colorbar=dict(title=dict(text=value_title, side="right"), thickness=12,
                                      len=(dom[1] - dom[0]) * 0.9, y=(dom[0] + dom[1]) / 2,
                                      x=1.0 + 0.08, tickfont=dict(size=10)))), row=ri + 1, col=col)


# ------------------------------------------------------------------------------------------------
# metrics against one variable (recombination: quality against parameters pruned).
# ------------------------------------------------------------------------------------------------
__all__ += ["metric_curves"]


def metric_curves(df: pd.DataFrame, x: str, metrics: Sequence[str], group: str | None = None,
                  reference: pd.DataFrame | None = None, reference_name: str = "name", log_x: bool = False,
                  title: str | None = None, x_title: str | None = None, height: int = 340,
                  markers_only: Sequence = ()):
    """Metrics against one variable (e.g. PSNR, SSIM, mIoU against the parameter count over pruning
    rounds): one panel per metric, one line per value of ``group`` (sorted by ``x``; the groups named
    in ``markers_only`` as unconnected markers); rows of ``reference`` (same columns, e.g. the
    teachers) are drawn as star markers named by ``reference[reference_name]``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("give at least one metric column")
    for name, frame in (("df", df), ("reference", reference)):
        if frame is None:
            continue
        missing = [c for c in [x, *metrics] if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} has no column(s) {missing}; columns: {list(frame.columns)}")
    if group is not None and group not in df.columns:
        raise ValueError(f"group={group!r} is not a column; columns: {list(df.columns)}")
    groups = [None] if group is None else list(pd.unique(df[group]))
    unknown = [g for g in markers_only if g not in groups]
    if unknown:
        raise ValueError(f"markers_only names {unknown}, which are not values of {group!r}: {groups}")
    colors = palette(len(groups) + (0 if reference is None else len(reference)))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.08)
    for k, m in enumerate(metrics, start=1):
        for gi, g in enumerate(groups):
            part = (df if g is None else df[df[group] == g]).sort_values(x)
            fig.add_trace(go.Scatter(
                x=part[x].to_numpy(), y=part[m].to_numpy(dtype=float).round(6),
                mode="markers" if g in markers_only else "lines+markers",
                name=str(g) if g is not None else m, legendgroup=str(g), showlegend=k == 1,
                line=dict(color=colors[gi], width=2), marker=dict(size=7),
                hovertemplate=f"{_esc(str(g) if g is not None else '')}<br>{_esc(x)} %{{x:.4g}}<br>"
                              f"{_esc(m)} %{{y:.4g}}<extra></extra>"), row=1, col=k)
        if reference is not None:
            for ri, (_, row) in enumerate(reference.iterrows()):
                name = str(row[reference_name]) if reference_name in reference.columns else f"reference {ri + 1}"
                fig.add_trace(go.Scatter(
                    x=[row[x]], y=[round(float(row[m]), 6)], mode="markers", name=name, legendgroup=f"ref{ri}",
                    showlegend=k == 1, marker=dict(symbol="star", size=13, color=colors[len(groups) + ri],
                                                   line=dict(width=1, color="#333333")),
                    hovertemplate=f"{_esc(name)}<br>{_esc(x)} %{{x:.4g}}<br>{_esc(m)} %{{y:.4g}}<extra></extra>"),
                    row=1, col=k)
    fig.update_xaxes(title_text=x_title or x, type="log" if log_x else None)
    width = fit_width(max(420, 300 * len(metrics) + 100))
    fig.update_layout(template="plotly_white", width=width, title=title,
                      legend=dict(font=dict(size=11)), margin=dict(l=50, r=10, t=70 if title else 40))
    names = [t.name for t in fig.data if t.showlegend]
    fig.update_layout(height=_legend_below(fig, names, width, height, plot_bottom=50))
    return fig


# ------------------------------------------------------------------------------------------------
# panels side by side (added with the CFL notebook: "feature space | common space" as one static
# figure, readable in a stored notebook where the linked widget is not rendered)
# ------------------------------------------------------------------------------------------------
def side_by_side(figures: Sequence, titles: Sequence[str] | None = None, *, panel_width: int = 440,
                 spacing: float = 0.04):
    """Several figures (e.g. two :func:`embedding_scatter` maps) as the panels of one row.

    Traces keep their legend groups, so clicking a class in the legend hides it in every panel;
    only the last figure's legend entries are shown (the panels share classes and sources), and
    its legends (``legend``, ``legend2``) are kept. Axes keep equal x/y scale per panel (as in
    :func:`embedding_scatter`), without tick labels. ``titles`` default to the figures' titles.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figures = list(figures)
    if not figures or not all(isinstance(f, go.Figure) for f in figures):
        raise TypeError("side_by_side takes a non-empty list of plotly go.Figure objects")
    n = len(figures)
    if titles is None:
        titles = [f.layout.title.text or "" for f in figures]
    if len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} figures")
    fig = make_subplots(rows=1, cols=n, subplot_titles=list(titles), horizontal_spacing=spacing)
    for k, f in enumerate(figures, start=1):
        for tr in f.data:
            tr = go.Figure(data=[tr]).data[0]  # a copy: the source figures stay as they are
            if k < n:
                tr.showlegend = False
            fig.add_trace(tr, row=1, col=k)
        x_name = "x" if k == 1 else f"x{k}"
        fig.update_xaxes(showticklabels=False, zeroline=False, showgrid=True, row=1, col=k,
                         title_text=f.layout.xaxis.title.text)
        fig.update_yaxes(showticklabels=False, zeroline=False, scaleanchor=x_name, scaleratio=1,
                         row=1, col=k, title_text=f.layout.yaxis.title.text)
    last = figures[-1].layout
    height = max((f.layout.height or 520) for f in figures)
    margin = dict(last.margin.to_plotly_json()) if last.margin else {}
    has_legend2 = last.legend2 is not None and bool(last.legend2.to_plotly_json())
    # room above the panels for the panel titles and, above them, the sources' legend
    margin["t"] = max(margin.get("t", 40) or 40, 100 if has_legend2 else 60)
    panel_width = min(panel_width, (MAX_WIDTH - 60) // n)
    fig.update_layout(template="plotly_white", height=height, width=panel_width * n + 60,
                      legend=last.legend, margin=margin, dragmode=last.dragmode,
                      hoverlabel=dict(namelength=-1))
    if has_legend2:
        plot_h = max(height - margin["t"] - (margin.get("b") or 0), 100)
        fig.update_layout(legend2=last.legend2)
        fig.update_layout(legend2=dict(y=1 + 34 / plot_h, yanchor="bottom", x=1, xanchor="right"))
    return fig
