"""Shared fixtures: a real server process on loopback, started the way a user starts it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from backend.runtime import apply_runtime_env

apply_runtime_env()  # the app's OpenMP settings (backend/runtime.py) for models run in the test process too

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    base_url: str
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.proc.kill()
        self.proc.wait()


def start_server(data_dir: Path, *args: str, env: dict | None = None, timeout: float = 180) -> LiveServer:
    """Start `python app.py` on a free loopback port and wait until /healthz answers."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    server = LiveServer(proc, f"http://127.0.0.1:{port}", data_dir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:  # up (/healthz), then the default model loaded or failed (/readyz), as a user's first request wants
            if httpx.get(server.base_url + "/healthz", timeout=2).status_code == 200:
                ready = httpx.get(server.base_url + "/readyz", timeout=2)
                if ready.status_code == 200 or ready.json().get("state") == "failed":
                    return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"server did not answer /healthz within {timeout}s:\n{server.log()[-4000:]}")


@pytest.fixture
def server_factory(tmp_path):
    """Call with extra CLI args; every server started is stopped at teardown."""
    started: list[LiveServer] = []

    def make(*args: str, data_dir: Path | None = None, env: dict | None = None) -> LiveServer:
        s = start_server(data_dir or tmp_path / "data", *args, env=env)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# Derived caches (the dequantized bundled model, converted tokenizers) are shared by every test's data
# dir, and kept between runs in the ignored ./data folder, so the bundled model is dequantized once.
os.environ.setdefault("PLAYGROUND_CACHE_DIR", str(ROOT / "data" / "test-cache"))
# A job that registers a model queues its report card (backend/evals/job.py): CPU work that the tests of other
# features do not want beside them. tests/test_evals.py turns it on where it is the behaviour under test.
os.environ.setdefault("PLAYGROUND_EVAL_ON_REGISTER", "0")


# Browser tests drive Debian's chromium (apt) through the playwright package; never `playwright install`.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def launch_chromium(playwright):
    """A headless Debian chromium for a playwright session."""
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)


@contextmanager
def open_tab(server, tab: str, ready: str, width: int = 1400, height: int = 1600):
    """A headless page on the app with `tab` open, once `ready` (a CSS selector) is on the page."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(server.base_url + "/")
        page.get_by_role("tab", name=tab, exact=True).click()
        page.wait_for_selector(ready)
        yield page
        browser.close()


def set_slider(page, elem_id: str, value) -> None:
    """Type `value` into a Gradio slider's number box and wait until the slider itself holds it. A slider in an
    accordion that has just opened may still be mounting and drop the first typing; type again then."""
    box = page.locator(f"#{elem_id} input[type=number]")
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        try:
            page.wait_for_function("([id, v]) => document.querySelector(`#${id} input[type=range]`)?.value === v",
                                   arg=[elem_id, str(value)], timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; the last try re-raises
            if attempt == 2:
                raise


def log_in(page, name: str, password: str) -> None:
    """Sign in through the visible login strip of the open tab and wait until it says who we are."""
    form = page.locator(".pg-login-form:visible")
    form.locator("input[name=name]").fill(name)
    form.locator("input[name=password]").fill(password)
    form.get_by_role("button", name="Log in").click()
    page.locator(".pg-whoami:visible").wait_for(timeout=30_000)


@pytest.fixture
def page():
    """A fresh headless page (modules that share one page across tests define their own `page`)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser.new_page()
        browser.close()


# ---- the sandbox: tests that need it FAIL where isolation is missing ------------------------------------
# A skip would keep CI green on a machine whose install forgot bubblewrap (`make install` installs it).
# Only a machine that truly cannot isolate sets PLAYGROUND_ALLOW_NO_SANDBOX=1, and then they skip.
NO_SANDBOX_OPT_OUT = "PLAYGROUND_ALLOW_NO_SANDBOX"


def require_sandbox() -> None:
    from backend.tools.sandbox import isolation
    iso = isolation()
    if iso["bwrap"]:
        return
    if os.environ.get(NO_SANDBOX_OPT_OUT) == "1":
        pytest.skip(f"no sandbox isolation here ({iso['why']}); {NO_SANDBOX_OPT_OUT}=1 allows skipping")
    pytest.fail(f"no sandbox isolation here: {iso['why']}. Run `make install` (it installs bubblewrap) or, on a "
                f"machine that truly cannot isolate, set {NO_SANDBOX_OPT_OUT}=1", pytrace=False)


@pytest.fixture
def sandbox_required():
    require_sandbox()
