"""Idle RSS of the real app with the bundled model loaded, after it served one request, per --prefill-weights.

    .venv/bin/python scripts/measure_prefill_memory.py [--weights auto,q4,bf16] [--repeat 2] [--data-dir DIR]

Each run starts `python app.py --no-worker --prefill-weights W` in a subprocess, waits until /readyz says the
model is loaded, sends one chat request (a ~300-token prompt, 16 new tokens), waits until the server is idle
(no rows, nothing waiting) and --settle seconds more, then reads VmRSS and VmHWM from /proc/PID/status. The
variants alternate run by run; the last line is JSON with each variant's median. Set PLAYGROUND_CACHE_DIR to
share the converted model between runs (the first load of a fresh cache converts the GGUF).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
PROMPT = " ".join(f"Note {i}: the pelican flew over the harbour at dawn and counted the boats." for i in range(14))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out


def one_run(weights: str, data_dir: Path, settle: float, timeout: float, root: Path = ROOT) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(data_dir / f"app-{weights}-{port}.log", "wb")
    flag = [] if weights == "default" else ["--prefill-weights", weights]
    proc = subprocess.Popen([sys.executable, str(root / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data_dir), "--no-worker", *flag],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited with {proc.returncode}; see {log.name}")
            try:
                r = httpx.get(base + "/readyz", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app not ready in {timeout} s; see {log.name}")
            time.sleep(0.5)
        loaded = status_kb(proc.pid)
        body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": PROMPT}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=timeout)
        r.raise_for_status()
        usage = r.json()["usage"]
        while True:  # idle: the request's rows left the batch
            serving = httpx.get(base + "/readyz", timeout=5).json()["serving"][MODEL]
            if serving["rows"] == 0 and serving["waiting"] == 0 and serving["prefilling"] == 0:
                break
            time.sleep(0.1)
        time.sleep(settle)
        idle = status_kb(proc.pid)
        serving = httpx.get(base + "/readyz", timeout=5).json()["serving"][MODEL]
        return {"weights": weights, "prefill_weights": serving.get("prefill_weights"),
                "prompt_tokens": usage["prompt_tokens"], "loaded_rss_mb": round(loaded["VmRSS"] / 1024, 1),
                "idle_rss_mb": round(idle["VmRSS"] / 1024, 1), "peak_rss_mb": round(idle["VmHWM"] / 1024, 1),
                "idle_anon_mb": round(idle["RssAnon"] / 1024, 1), "idle_file_mb": round(idle["RssFile"] / 1024, 1),
                "memory_trims": serving.get("memory_trims")}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="q4,bf16",
                    help="comma-separated --prefill-weights values; 'default' passes no flag (an older checkout)")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose app.py runs (default: this one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--data-dir", default=None, help="the app's data dir (default: a temp dir)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="measure-rss-")
    data_dir = Path(args.data_dir or tmp.name)
    data_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {w: [] for w in args.weights.split(",")}
    for i in range(args.repeat):
        for w in runs:
            res = one_run(w, data_dir, args.settle, args.timeout, Path(args.root))
            runs[w].append(res)
            print(f"run {i + 1} --prefill-weights {w}: {res}", flush=True)
    summary = {w: {k: statistics.median(r[k] for r in rs) for k in ("loaded_rss_mb", "idle_rss_mb", "peak_rss_mb",
                                                                      "idle_anon_mb", "idle_file_mb")}
               | {"prefill_weights": rs[0]["prefill_weights"], "runs": len(rs)} for w, rs in runs.items()}
    print(json.dumps({"measure": "idle RSS of app.py after one request", "results": summary}))


if __name__ == "__main__":
    main()
