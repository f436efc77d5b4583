"""kaviz.notebook.configure_plotly: figures drawn offline (no CDN), no upload button, small notebooks."""
import json

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from kaviz import notebook, plots


@pytest.fixture
def restore_renderer(monkeypatch):
    before = pio.renderers.default
    monkeypatch.delenv("KAVIZ_PLOTLY_RENDERER", raising=False)
    yield
    pio.renderers.default = before


def test_default_renderer_is_offline_and_hides_the_share_button(restore_renderer):
    import warnings
    assert notebook.configure_plotly() == "plotly_mimetype" == pio.renderers.default
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # plotly warns about config keys it does not know
        bundle = pio.renderers._build_mime_bundle(go.Figure(go.Scatter(x=[1], y=[2])).to_dict())
    assert set(bundle) == {"application/vnd.plotly.v1+json"}   # no HTML, no script, no plotly.js copy
    text = json.dumps(bundle)
    assert "cdn.plot.ly" not in text and "<script" not in text and len(text) < 50_000  # plotly.js is ~4 MB
    config = bundle["application/vnd.plotly.v1+json"]["config"]
    assert config["showSendToCloud"] is False and config["displaylogo"] is False


def test_report_renderer_embeds_plotly_js_with_the_config(restore_renderer, monkeypatch):
    monkeypatch.setenv("KAVIZ_PLOTLY_RENDERER", "plotly_mimetype+notebook")
    assert notebook.configure_plotly() == "plotly_mimetype+notebook"
    assert pio.renderers["notebook"].config["displaylogo"] is False
    assert pio.renderers["plotly_mimetype"].config == {**plots.PLOTLY_CONFIG}


def test_cdn_and_unknown_renderers_are_refused_with_the_next_step(restore_renderer):
    with pytest.raises(ValueError, match="CDN.*plotly_mimetype"):
        notebook.configure_plotly("plotly_mimetype+notebook_connected")
    with pytest.raises(ValueError, match=r"unknown plotly renderer\(s\) \['nope'\].*KAVIZ_PLOTLY_RENDERER"):
        notebook.configure_plotly("nope")
