"""Start the real app (`python app.py`, its own process, the app's runtime settings) for an HTTP benchmark."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir, cache_dir, threads: int, *extra: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """The app on a free loopback port, returned once /readyz says the default model is loaded."""
    import httpx
    port = free_port()
    log = open(Path(data_dir) / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data_dir), "--no-worker", "--threads", str(threads), *extra],
                            cwd=ROOT, env={**os.environ, "PLAYGROUND_CACHE_DIR": str(cache_dir)},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {data_dir}/server.log")
        try:
            r = httpx.get(url + "/readyz", timeout=2)
            if r.status_code == 200:
                return proc, url
            if r.json().get("state") == "failed":
                proc.kill()
                raise RuntimeError(r.json()["message"])
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server was not ready within {timeout} s")


def stop_app(proc: subprocess.Popen) -> None:
    import signal
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
