"""The browser test runs from `make browser` (part of `make test`), not from `pytest tests`: it starts
JupyterLab and chromium and executes a notebook (~2 minutes)."""
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KAVIZ_BROWSER_TEST") == "1":
        return
    skip = pytest.mark.skip(reason="the browser test runs with `make browser` (KAVIZ_BROWSER_TEST=1)")
    for item in items:
        if "tests/browser" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (the screenshot fixture reads ``rep_call``)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
