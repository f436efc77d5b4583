"""kaviz.plots: figure structure (traces, symbols, WebGL switch, customdata, axes, colour ranges)."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from kaviz import plots as P


def emb_df(n_per_source=30, sources=("student", "t1", "t2"), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in sources:
        for i in range(n_per_source):
            rows.append((rng.normal(), rng.normal(), s, i % classes, i))
    df = pd.DataFrame(rows, columns=["x", "y", "source", "label", "index"])
    df.attrs["method"] = "tsne"
    return df


def data_traces(fig):
    return [t for t in fig.data if not (isinstance(t.meta, dict) and t.meta.get("legend_only"))]


# ------------------------------------------------------------------------------------------------
# embedding_scatter
# ------------------------------------------------------------------------------------------------
def test_scatter_one_trace_per_source_and_class_plus_source_legend():
    df = emb_df()
    fig = P.embedding_scatter(df, class_names=["cat", "dog", "eel"], title="common space")
    traces = data_traces(fig)
    assert len(traces) == 3 * 3
    assert len(fig.data) - len(traces) == 3            # one grey legend entry per source
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    sym = {}
    for t in traces:
        sym.setdefault(t.meta["source"], set()).add(t.marker.symbol)
    assert all(len(v) == 1 for v in sym.values())      # one symbol per source...
    assert len({next(iter(v)) for v in sym.values()}) == 3  # ...and distinct between sources
    colors = {}
    for t in traces:
        colors.setdefault(t.meta["label"], set()).add(t.marker.color)
    assert all(len(v) == 1 for v in colors.values()) and len(
        {next(iter(v)) for v in colors.values()}) == 3
    assert {t.name for t in traces} == {"cat", "dog", "eel"}
    assert sum(bool(t.showlegend) for t in traces) == 3  # each class once in the legend
    assert fig.layout.yaxis.scaleanchor == "x"
    assert fig.layout.xaxis.title.text == "t-SNE 1"
    assert fig.layout.title.text == "common space"


def test_scatter_customdata_is_sample_index_and_coordinates_rounded():
    df = emb_df()
    fig = P.embedding_scatter(df)
    for t in data_traces(fig):
        part = df[(df["source"] == t.meta["source"]) & (df["label"] == t.meta["label"])]
        assert list(t.customdata) == part["index"].tolist()
        np.testing.assert_allclose(t.x, part["x"].round(3), atol=1e-6)
        assert np.allclose(np.asarray(t.x) * 1000, np.round(np.asarray(t.x) * 1000), atol=1e-3)


def test_scatter_switches_to_webgl_above_threshold():
    df = emb_df(n_per_source=40)
    assert all(isinstance(t, go.Scattergl) for t in data_traces(
        P.embedding_scatter(df, webgl_threshold=100)))
    assert all(isinstance(t, go.Scatter) for t in data_traces(
        P.embedding_scatter(df, webgl_threshold=1000)))


def test_scatter_missing_labels_and_single_source():
    df = emb_df(sources=("a",))
    df["label"] = np.nan
    fig = P.embedding_scatter(df)
    assert len(fig.data) == 1                          # no source legend for a single source
    assert fig.data[0].name == "no label"


def test_scatter_many_classes_get_distinct_colours_and_wrapped_legend():
    df = emb_df(n_per_source=60, sources=("a",), classes=30)
    fig = P.embedding_scatter(df)
    assert len({t.marker.color for t in fig.data}) == 30
    assert fig.layout.legend.orientation == "h"


def test_scatter_selected_and_highlight():
    df = emb_df()
    fig = P.embedding_scatter(df, selected=[0, 4])
    for t in data_traces(fig):
        expect = [k for k, i in enumerate(t.customdata) if i in (0, 4)]
        op = np.asarray(t.marker.opacity)
        assert list(np.flatnonzero(op == 1)) == expect
        assert (op[op < 1] < 0.5).all() and t.selectedpoints is None
    assert P.highlighted(fig) == {0, 4}
    P.highlight(fig, None)
    assert P.highlighted(fig) is None
    assert all(t.marker.opacity == 0.85 for t in data_traces(fig))     # each trace's own opacity back


def test_scatter_continuous_colour_and_hover_columns():
    df = emb_df()
    df["score"] = np.linspace(0, 1, len(df)) + 0.001
    fig = P.embedding_scatter(df, color="score", hover=["score"])
    assert len(fig.data) == 3                          # one trace per source
    assert fig.data[0].marker.coloraxis == "coloraxis"
    assert fig.data[0].text[0].startswith("score: ")


def test_scatter_errors():
    df = emb_df()
    with pytest.raises(ValueError, match=r"missing \['index'\]"):
        P.embedding_scatter(df.drop(columns="index"))
    with pytest.raises(ValueError, match=r"hover columns \['nope'\]"):
        P.embedding_scatter(df, hover=["nope"])
    many = emb_df(n_per_source=2, sources=[f"s{i}" for i in range(len(P.SYMBOLS) + 1)])
    with pytest.raises(ValueError, match="marker symbols"):
        P.embedding_scatter(many)


def test_palette_distinct_up_to_thirty():
    assert len(set(P.palette(10))) == 10
    assert len(set(P.palette(30))) == 30


# ------------------------------------------------------------------------------------------------
# training_curves
# ------------------------------------------------------------------------------------------------
def history(n=8, best=5, lr_step=True):
    ep = np.arange(1, n + 1)
    h = pd.DataFrame({"epoch": ep, "train/kd": 1 / ep, "val/kd": 1.2 / ep,
                      "train/mmd": 0.1 / ep, "val/accuracy": 1 - 0.5 / ep,
                      "lr": np.where(ep <= n // 2, 1e-3, 1e-4) if lr_step else 1e-3})
    h.attrs["best_epoch"] = best
    return h


def test_training_curves_single_run_panels_and_best_epoch():
    fig = P.training_curves(history(), title="CFL")
    titles = [a.text for a in fig.layout.annotations]
    assert {"loss terms", "metrics", "learning rate"} <= set(titles)
    names = [t.name for t in fig.data]
    assert names == ["kd (train)", "kd (val)", "mmd (train)", "accuracy (val)", "lr"]
    assert fig.data[0].line.dash == "solid" and fig.data[1].line.dash == "dash"
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.layout.yaxis.type == "log"              # positive loss terms
    assert fig.layout.yaxis2.type != "log"
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1 == 5]
    assert len(vlines) == 3
    assert any("best" in (a.text or "") for a in fig.layout.annotations)


def test_training_curves_no_lr_panel_when_constant_and_linear_for_negative_terms():
    h = history(lr_step=False)
    h["train/kd"] = h["train/kd"] - 0.5
    fig = P.training_curves(h)
    assert "learning rate" not in [a.text for a in fig.layout.annotations]
    assert fig.layout.yaxis.type != "log"


def test_training_curves_linear_when_losses_span_less_than_a_decade():
    h = history()[["epoch", "train/kd", "val/accuracy"]]
    h["train/kd"] = np.linspace(2.5, 1.5, len(h))
    assert P.training_curves(h).layout.yaxis.type != "log"
    assert P.training_curves({"a": h, "b": h}).layout.yaxis.type != "log"


def test_training_curves_selection_and_overlay_of_runs():
    fig = P.training_curves(history(), terms=["kd"], metrics=[])
    assert {t.name for t in fig.data} == {"kd (train)", "kd (val)", "lr"}
    kd = history()[["epoch", "train/kd", "val/kd", "val/accuracy"]]
    kd.attrs["best_epoch"] = 7
    fig = P.training_curves({"CFL": history(), "KD": kd})
    assert [a.text for a in fig.layout.annotations][:3] == ["kd", "mmd", "accuracy"]
    run_colors = {}
    for t in fig.data:
        run_colors.setdefault(t.name.split(" ")[0], set()).add(t.line.color)
    assert all(len(c) == 1 for c in run_colors.values()) and len(run_colors) == 2
    assert sum(bool(t.showlegend) for t in fig.data) == 4  # CFL/KD x train/val, once each
    # the KD run has no mmd: its best-epoch line is not drawn in the mmd panel
    mmd_lines = [s for s in fig.layout.shapes if s.xref == "x2"]
    assert [s.x0 for s in mmd_lines] == [5]


def test_training_curves_errors():
    with pytest.raises(ValueError, match="no 'train/<term>'"):
        P.training_curves(pd.DataFrame({"epoch": [1, 2], "loss": [1, 0.5]}))
    with pytest.raises(ValueError, match=r"unknown terms \['recon'\].*\['kd', 'mmd'\]"):
        P.training_curves(history(), terms=["recon"])
    with pytest.raises(TypeError, match="DataFrame"):
        P.training_curves([1, 2, 3])


# ------------------------------------------------------------------------------------------------
# feature_grid, image_grid, bar
# ------------------------------------------------------------------------------------------------
def test_feature_grid_symmetric_per_row_with_images():
    rng = np.random.default_rng(0)
    img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8)) * 5
    fig = P.feature_grid([[img, a, a * 2], [img, b, None]], titles=["image", "in", "out"],
                         row_titles=["x0", "x1"])
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    imgs = [t for t in fig.data if isinstance(t, go.Image)]
    assert len(heat) == 3 and len(imgs) == 2
    assert imgs[0].source.startswith("data:image/png;base64,")
    ca0, ca1 = fig.layout.coloraxis, fig.layout.coloraxis2
    assert ca0.cmax == pytest.approx(np.abs(a * 2).max(), rel=1e-5) and ca0.cmin == -ca0.cmax
    assert ca1.cmax == pytest.approx(np.abs(b).max(), rel=1e-5) and ca1.cmin == -ca1.cmax
    assert heat[0].coloraxis == heat[1].coloraxis == "coloraxis"
    assert heat[2].coloraxis == "coloraxis2"
    from plotly.colors import get_colorscale
    assert [c[1] for c in ca0.colorscale] == [c[1] for c in get_colorscale("RdBu_r")]
    assert fig.layout.yaxis2.autorange == "reversed"


def test_feature_grid_array_input_and_symmetry_modes():
    maps = np.arange(2 * 3 * 4 * 4, dtype=float).reshape(2, 3, 4, 4) - 40
    g = P.feature_grid(maps, symmetric="global")
    assert len(g.data) == 6 and {t.coloraxis for t in g.data} == {"coloraxis"}
    assert g.layout.coloraxis.cmax == pytest.approx(55) and g.layout.coloraxis.cmin == -55
    m = P.feature_grid(maps, symmetric="map")
    assert len({t.coloraxis for t in m.data}) == 6
    # the first map is all negative (-40..-25): a sequential scale ending at 0, not a diverging one
    assert (m.layout.coloraxis.cmin, m.layout.coloraxis.cmax) == (pytest.approx(-40), 0)
    n = P.feature_grid(maps, symmetric=None)
    assert n.layout.coloraxis.cmin == pytest.approx(-40) and n.layout.coloraxis.cmax == \
        pytest.approx(-25)


def test_feature_grid_errors():
    with pytest.raises(ValueError, match="symmetric must be"):
        P.feature_grid([[np.zeros((2, 2))]], symmetric="col")
    with pytest.raises(ValueError, match=r"maps\[0\]\[1\] has shape \(2, 2, 2, 2\)"):
        P.feature_grid([[np.zeros((2, 2)), np.zeros((2, 2, 2, 2))]])
    with pytest.raises(ValueError, match="titles has 1 entries for 2 columns"):
        P.feature_grid([[np.zeros((2, 2)), np.zeros((2, 2))]], titles=["a"])
    with pytest.raises(ValueError, match=r"\(rows, cols, H, W\)"):
        P.feature_grid(np.zeros((2, 2, 2)))


def test_image_conversions_and_grid():
    chw = np.random.default_rng(0).random((3, 5, 6))
    out = P.to_rgb_uint8(chw)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    assert P.to_rgb_uint8(np.zeros((4, 4))).shape == (4, 4, 3)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        P.to_rgb_uint8(np.full((4, 4, 3), 7.0))
    import io

    from PIL import Image
    im = Image.open(io.BytesIO(P.png_bytes(np.zeros((8, 8, 3), np.uint8), size=96)))
    assert im.size == (96, 96)
    fig = P.image_grid(np.random.default_rng(0).random((5, 3, 4, 4)), titles=list("abcde"),
                       cols=2)
    assert len(fig.data) == 5 and all(isinstance(t, go.Image) for t in fig.data)
    with pytest.raises(ValueError, match="2 titles for 5 images"):
        P.image_grid(np.zeros((5, 4, 4, 3), np.uint8), titles=["a", "b"])


def test_bar():
    fig = P.bar(pd.Series([0.165, 0.282], index=["p1", "p2"], name="gate"))
    assert list(fig.data[0].x) == ["p1", "p2"] and fig.layout.yaxis.title.text == "gate"
    df = pd.DataFrame({"student": ["KD", "CFL", "KD", "CFL"], "acc": [0.7, 0.72, 0.6, 0.65],
                       "std": [0.01, 0.02, 0.01, 0.03], "data": ["a", "a", "b", "b"]})
    fig = P.bar(df, x="student", y="acc", error="std", color="data")
    assert len(fig.data) == 2 and list(fig.data[1].error_y.array) == [0.01, 0.03]
    with pytest.raises(ValueError, match="error='sd' is not a column"):
        P.bar(df, x="student", y="acc", error="sd")


def test_side_by_side_panels_share_legend_and_keep_equal_axes():
    rng = np.random.default_rng(0)
    dfs = [pd.DataFrame({"x": rng.normal(size=12), "y": rng.normal(size=12), "source": ["a", "b"] * 6,
                         "label": np.repeat([0, 1, 2], 4), "index": np.tile(np.arange(6), 2)}) for _ in range(2)]
    figs = [P.embedding_scatter(df, title=t) for df, t in zip(dfs, ["feature space", "common space"])]
    n0 = len(figs[0].data)
    fig = P.side_by_side(figs)
    assert len(fig.data) == n0 + len(figs[1].data)
    assert [a.text for a in fig.layout.annotations][:2] == ["feature space", "common space"]
    assert not any(tr.showlegend for tr in fig.data[:n0])  # one legend: the last panel's
    assert any(tr.showlegend for tr in fig.data[n0:])
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis2.scaleanchor == "x2"
    assert {tr.xaxis for tr in fig.data[n0:]} == {"x2"}
    assert figs[0].data[0].showlegend in (True, None)  # the inputs are left unchanged
    with pytest.raises(ValueError, match="titles"):
        P.side_by_side(figs, titles=["one"])
    with pytest.raises(TypeError, match="go.Figure"):
        P.side_by_side([])


def test_training_curves_label_whole_epochs():
    few = P.training_curves(history(n=2, best=2))
    assert few.layout.xaxis.dtick == 1 and few.layout.xaxis2.dtick == 1
    many = P.training_curves({"a": history(n=40, best=30)}, terms=["kd"], metrics=["accuracy"])
    assert many.layout.xaxis.dtick is None  # plotly picks the ticks for long runs


# ------------------------------------------------------------------------------------------------
# figures that fit JupyterLab (issue 18): width, legends, palettes, colour bars, titles
# ------------------------------------------------------------------------------------------------
def _teacher_history(scale, n=6):
    ep = np.arange(1, n + 1)
    loss = scale / ep
    return pd.DataFrame({"epoch": ep, "train/loss": loss, "train/ce": loss, "val/loss": loss * 1.1,
                         "val/ce": loss * 1.1, "val/accuracy": 1 - 0.5 / ep})


def _all_figures():
    rng = np.random.default_rng(0)
    df = emb_df(n_per_source=40, classes=20)
    cur = pd.DataFrame({"params": np.tile([1e5, 2e5], 3), "a": rng.random(6), "b": rng.random(6),
                        "c": rng.random(6), "d": rng.random(6), "e": rng.random(6),
                        "g": np.repeat(["x", "y", "z"], 2)})
    seg = rng.integers(0, 4, size=(8, 8))
    return {
        "training_curves (one run)": P.training_curves(history()),
        "training_curves (runs)": P.training_curves({f"run number {i}": history() for i in range(5)}),
        "embedding_scatter": P.embedding_scatter(df, width=2000),
        "side_by_side": P.side_by_side([P.embedding_scatter(df)] * 3, panel_width=600),
        "metric_curves": P.metric_curves(cur, x="params", metrics=list("abcde"), group="g"),
        "dense_predictions": P.dense_predictions(
            rng.random((8, 8, 3)), {"seg": {f"model {i}": seg for i in range(8)}}, kinds={"seg": "labels"}),
        "feature_grid": P.feature_grid([[rng.normal(size=(4, 4)) for _ in range(12)]], symmetric="map"),
        "image_grid": P.image_grid(rng.random((24, 4, 4, 3)), cols=24, cell=96),
        "bar": P.bar(pd.Series([1.0, 2.0], index=["a", "b"])),
    }


def test_every_figure_fits_the_output_area():
    for name, fig in _all_figures().items():
        w = fig.layout.width
        assert w is None or w <= P.MAX_WIDTH <= 1100, f"{name}: width {w}"
    assert P.embedding_scatter(emb_df()).layout.width is None  # fills its cell by default


def test_curve_legends_are_rows_below_the_plot_with_room_for_them():
    for fig in (P.training_curves({f"a long run name {i}": history() for i in range(9)}),
                P.training_curves(history())):
        lg = fig.layout.legend
        assert lg.orientation == "h" and lg.yref == "container" and lg.yanchor == "bottom"
        shown = [t.name for t in fig.data if t.showlegend is not False]
        per_row = max(1, (fig.layout.width - 40) // lg.entrywidth)
        rows = -(-len(shown) // per_row)
        assert fig.layout.margin.b >= 21 * rows + 40     # the rows fit under the x axis title
        assert lg.entrywidth >= 7 * max(len(n) for n in shown)  # entries are not cut


def test_training_curves_draw_a_term_equal_to_another_once():
    fig = P.training_curves({"resnet": _teacher_history(2.0), "vgg": _teacher_history(3.0)})
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == ["loss = ce", "accuracy"] and "ce" not in titles
    one = P.training_curves(_teacher_history(2.0))
    assert {t.name for t in one.data} == {"loss = ce (train)", "loss = ce (val)", "accuracy (val)"}
    # equal in one run only: both kept
    other = _teacher_history(3.0)
    other["train/ce"] = other["train/ce"] * 0.5
    fig = P.training_curves({"resnet": _teacher_history(2.0), "vgg": other})
    assert [a.text for a in fig.layout.annotations][:3] == ["loss", "ce", "accuracy"]


def _deutan(rgb):
    """Viénot, Brettel & Mollon (1999) deuteranopia simulation in linear RGB."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.29275, 0.70725, 0.0], [0.29275, 0.70725, 0.0], [-0.02234, 0.02234, 1.0]])
    return np.clip(lin @ m.T, 0, 1)


def _rgb(colors):
    return np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors])


def test_palette_many_classes_hue_times_lightness_and_colour_blind_aware():
    twenty = P.palette(20)
    assert len(set(twenty)) == 20 and len(set(P.palette(50))) == 50
    assert twenty[:10] == P.palette(10)
    rgb = _rgb(twenty)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(20) * 9
    assert d[:10, :10].min() > 0.15                   # the ten base hues are far apart (0.16)
    # the light tier is closer (light orange vs light yellow: 0.071); its markers carry an outline too
    assert d.min() > 0.065
    light = rgb[10:].mean(axis=1) - rgb[:10].mean(axis=1)
    assert (light > 0.15).all()                       # the second ten: same hues, lighter
    assert [P.palette_tier(i) for i in (0, 9, 10, 19)] == [0, 0, 1, 1]
    sim = _deutan(_rgb(P.palette(8)))                 # the first eight stay apart for a deutan eye
    ds = np.linalg.norm(sim[:, None] - sim[None], axis=-1) + np.eye(8) * 9
    assert ds.min() > 0.15
    old = _deutan(_rgb(["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F"]))
    do = np.linalg.norm(old[:, None] - old[None], axis=-1) + np.eye(8) * 9
    assert ds.min() > do.min()                        # better than the tab10 colours it replaces


def test_scatter_many_classes_outline_light_tier_and_bigger_markers():
    df = emb_df(n_per_source=60, sources=("a",), classes=20)
    fig = P.embedding_scatter(df)
    by_label = {t.meta["label"]: t for t in fig.data}
    assert by_label[0].marker.line.width == 0
    assert by_label[10].marker.line.width > 0 and by_label[10].marker.line.color == by_label[0].marker.color
    assert by_label[0].marker.size >= 8               # 60 points
    big = emb_df(n_per_source=700, sources=("a", "b", "c"), classes=3)
    assert data_traces(P.embedding_scatter(big))[0].marker.size >= 7


def test_heat_scale_diverging_only_with_both_signs():
    assert P.heat_scale(np.array([-1.0, 3.0])) == ("RdBu_r", -3.0, 3.0)
    assert P.heat_scale(np.array([0.0, 2.0, 5.0])) == ("Reds", 0.0, 5.0)
    assert P.heat_scale([np.array([1.0, 2.0]), np.array([0.5])]) == ("Reds", 0.0, 2.0)
    assert P.heat_scale(np.array([-4.0, -1.0])) == ("Blues_r", -4.0, 0.0)
    assert P.heat_scale(np.array([2.0, 5.0]), symmetric=False) == ("Viridis", 2.0, 5.0)


def test_feature_grid_colourbar_on_every_scale_and_shared_option():
    rng = np.random.default_rng(0)
    relu = [np.maximum(rng.normal(size=(6, 6)), 0) * (k + 1) for k in range(4)]
    img = np.zeros((6, 6, 3), np.uint8)
    for sym in ("map", "row", "global", None):
        fig = P.feature_grid([[img, *relu]], symmetric=sym)
        axes = {t.coloraxis for t in fig.data if isinstance(t, go.Heatmap)}
        assert axes and all(fig.layout[a].showscale for a in axes), sym
    per_map = P.feature_grid([[img, *relu]], symmetric="map")
    assert per_map.layout.coloraxis.colorscale[0][1] == go.Figure(
        layout=dict(coloraxis=dict(colorscale="Reds"))).layout.coloraxis.colorscale[0][1]
    assert per_map.layout.coloraxis.cmin == 0        # post-ReLU: sequential from 0
    shared = P.feature_grid([[img, *relu]], symmetric="map", shared=True)
    assert {t.coloraxis for t in shared.data if isinstance(t, go.Heatmap)} == {"coloraxis"}
    assert shared.layout.coloraxis.cmax == pytest.approx(max(float(a.max()) for a in relu), rel=1e-5)


def test_map_title_names_space_model_layer_and_method():
    assert P.map_title("common space", model="CFL · vgg8", layer="features", method="tsne",
                       params={"perplexity": 30}) == "common space · CFL · vgg8 · features · t-SNE (perplexity 30)"
    assert P.map_title(model="resnet", method="umap", params={"n_neighbors": 15, "min_dist": 0.1}) == \
        "resnet · UMAP (n neighbors 15, min dist 0.1)"


def test_highlight_clears_drawn_boxes():
    fig = P.embedding_scatter(emb_df())
    fig.update_layout(selections=[dict(type="rect", x0=0, x1=1, y0=0, y1=1)])
    P.highlight(fig, [1, 2])
    assert not fig.layout.selections
    fig.update_layout(selections=[dict(type="rect", x0=0, x1=1, y0=0, y1=1)])
    P.highlight(fig, [1, 2], clear_boxes=False)
    assert len(fig.layout.selections) == 1



def test_wrap_title_breaks_long_titles_to_the_figure_width():
    short = "CFL: student vs teacher"
    assert P.wrap_title(short) == short                        # fits: unchanged
    long = ("LSHFM: what each teacher (and its random-init control) explains of the student's fc.feat_fc "
            "on the validation images")
    wrapped = P.wrap_title(long)
    lines = wrapped.split("<br>")
    assert len(lines) >= 2 and " ".join(lines) == long              # nothing lost, broken at spaces
    assert max(map(len, lines)) < len(long)
    # control: a wider figure needs fewer lines, a narrower one more
    assert len(P.wrap_title(long, 2000).split("<br>")) == 1
    assert len(P.wrap_title(long, 300).split("<br>")) > len(lines)
