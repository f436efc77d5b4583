"""Harness for the browser test: a JupyterLab server on a free localhost port with a token, headless
Debian chromium driven by Playwright (never a downloaded browser), and a second client on the
notebook's kernel to read its state. Everything started here is stopped by :meth:`Lab.close`.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KAVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}

# JupyterLab settings for a test: every cell in the DOM (no windowing), no news pop-up.
_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def missing_requirements() -> str | None:
    """Why the browser test cannot run here (None if it can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`; .ci/run does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing: `pip install -e '.[dev]' -c constraints.txt`"
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        return f"jupyter-lab is not installed next to {sys.executable}: `pip install -e '.[lab]'`"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """JupyterLab serving ``workdir`` plus a chromium page at 1600×1000 (file browser open)."""

    def __init__(self, workdir: Path, log: Path):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.token = os.urandom(12).hex()
        self.runtime = self.workdir / ".runtime"
        self.settings = self.workdir / ".lab-settings"
        self.server = self.browser = self.pw = self.page = None
        self.kernel_clients = []
        self.log = open(log, "w")

    # -- start -----------------------------------------------------------------------------------
    def start(self, timeout: float = 90):
        for name, value in _SETTINGS.items():
            plugin, file = name.rsplit("/", 1)
            d = self.settings / plugin
            d.mkdir(parents=True, exist_ok=True)
            (d / file).write_text(json.dumps(value))
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(self.runtime),
               "JUPYTERLAB_SETTINGS_DIR": str(self.settings),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.workdir / ".lab-workspaces"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "CI": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        jupyter = str(Path(sys.executable).parent / "jupyter-lab")
        self.server = subprocess.Popen(
            [jupyter, "--no-browser", f"--port={self.port}", "--ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.workdir}", "--ServerApp.port_retries=0",
             "--LabApp.news_url=", "--ServerApp.terminals_enabled=False",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.server.returncode}; see {self.log.name}")
            try:
                self.api("status")
                break
            except OSError as exc:
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"jupyter lab did not answer on port {self.port} within {timeout} s; "
                                       f"see {self.log.name}") from exc
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        self.page = self.browser.new_page(viewport=VIEWPORT)
        self.console = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.requests = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        return self

    def api(self, path: str):
        url = f"http://127.0.0.1:{self.port}/api/{path}?token={self.token}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    # -- the kernel behind an open notebook ------------------------------------------------------
    def kernel(self, notebook: str):
        """A client on the kernel of ``notebook``'s session (shares the kernel with the page)."""
        from jupyter_client import BlockingKernelClient

        sessions = [s for s in self.api("sessions") if s["path"].endswith(notebook)]
        if not sessions:
            raise RuntimeError(f"no kernel session for {notebook}: {self.api('sessions')}")
        kid = sessions[0]["kernel"]["id"]
        conn = self.runtime / f"kernel-{kid}.json"
        kc = BlockingKernelClient(connection_file=str(conn))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        self.kernel_clients.append(kc)
        return kc

    def shutdown_kernels(self):
        """End every notebook session (and its kernel) of this server."""
        for kc in self.kernel_clients:
            try:
                kc.stop_channels()
            except Exception:  # noqa: BLE001
                pass
        self.kernel_clients = []
        for session in self.api("sessions"):
            req = urllib.request.Request(self.url(f"api/sessions/{session['id']}"), method="DELETE")
            with urllib.request.urlopen(req, timeout=30):
                pass

    # -- stop ------------------------------------------------------------------------------------
    def close(self):
        for kc in self.kernel_clients:
            try:
                kc.stop_channels()
            except Exception:  # noqa: BLE001
                pass
        for step in (lambda: self.browser and self.browser.close(), lambda: self.pw and self.pw.stop()):
            try:
                step()
            except Exception:  # noqa: BLE001
                pass
        if self.server is not None and self.server.poll() is None:
            # the server's own process group: jupyter lab and the kernels it started, nothing else
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(timeout=10)
        self.log.close()


def evaluate(kc, expr: str, timeout: float = 30):
    """``repr``-free value of a Python expression in the kernel (JSON round trip)."""
    reply = kc.execute("", silent=True, store_history=False,
                       user_expressions={"v": f"__import__('json').dumps({expr})"}, reply=True, timeout=timeout)
    res = reply["content"]["user_expressions"]["v"]
    if res.get("status") != "ok":
        raise RuntimeError(f"kernel could not evaluate {expr!r}: {res.get('ename')}: {res.get('evalue')}")
    return json.loads(ast.literal_eval(res["data"]["text/plain"]))
