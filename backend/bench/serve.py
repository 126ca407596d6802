"""python -m backend.bench serve [--clients 1,8,32] [--tokens 64] [--threads 2] [--llama-python PY] [--llama-server BIN]
                               [--peer-slots N] [--repeat 3]

Many users at once, as they meet the app: the real app (`python app.py`, its own process, the app's runtime
settings) on the bundled model, and C clients at once, each one streamed chat completion through the
official `openai` client (distinct prompts, temperature 0.8, a seed each, --tokens at most). Per level:
- aggregate tok/s: completion tokens of all C answers / wall time from the first request to the last token;
- time to first token (p50, p99 and worst) from each request's start;
- inter-token latency p99 (gaps between a stream's content chunks).
Goals (issue 12): 8 clients >= 3x the aggregate tok/s of 1 client with a worst first token <= 1.5 s;
32 clients >= 4x.

Peers, on the same GGUF file, the same thread count and the same clients (each built in a side environment,
never an app dependency):
- --llama-python PY: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`), which answers one request
  at a time (no parallel slots in 0.3.x);
- --llama-server BIN: llama.cpp's own `llama-server` (built from the llama.cpp that llama-cpp-python vendors,
  `cmake --build build --target llama-server`) with --peer-slots parallel slots (default: the most clients)
  and continuous batching, the stronger peer.
Goals: ours >= 1.5x a peer's aggregate tok/s at 8 clients and >= 1.2x its single-stream rate. A peer not given
(or that cannot start) is reported missing, never invented.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = ["Write a short story about a robot who learns to paint.", "Tell me a joke about pelicans.",
             "Explain how a bicycle works.", "Describe the ocean to someone who has never seen it.",
             "Write a poem about autumn leaves.", "What makes a good breakfast? Explain at length.",
             "Tell a story about a cat who becomes a detective.", "Explain why the sky is blue, step by step."]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_level(base_url: str, model: str, clients: int, tokens: int, round_no: int = 0) -> dict:
    """`clients` streamed chats at once; each round's prompts are new (a numbered first line), so no server
    answers a round from its prompt cache of the round before."""
    import openai
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    start = threading.Barrier(clients)
    out: list[dict | None] = [None] * clients

    def one(i: int) -> None:
        start.wait()
        try:
            run_one(i)
        except Exception as e:  # noqa: BLE001 - a refused or broken request is counted, not fatal
            out[i] = {"error": f"{type(e).__name__}: {e}"[:200], "stamps": []}

    def run_one(i: int) -> None:
        t0 = time.perf_counter()
        stamps, n = [], 0
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Question {round_no}.{i}: {QUESTIONS[i % len(QUESTIONS)]}"}],
            max_tokens=tokens,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if getattr(ch, "usage", None):
                n = ch.usage.completion_tokens
        out[i] = {"t0": t0, "stamps": stamps, "tokens": n or len(stamps)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [o for o in out if o and o["stamps"]]
    if not done:
        raise RuntimeError(f"none of {clients} requests returned text: {[o and o.get('error') for o in out][:2]}")
    wall = max(o["stamps"][-1] for o in done) - min(o["t0"] for o in done)
    ttft = [o["stamps"][0] - o["t0"] for o in done]
    gaps = [b - a for o in done for a, b in zip(o["stamps"], o["stamps"][1:])]
    total = sum(o["tokens"] for o in done)
    return {"clients": clients, "tok_s": total / wall, "tokens": total, "wall_s": wall,
            "ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 0.99), "ttft_max": max(ttft),
            "itl_p99": pct(gaps, 0.99) if gaps else None, "failed": clients - len(done),
            "errors": sorted({o["error"] for o in out if o and o.get("error")})[:3]}


def start_llama_server(python: str, gguf: str, threads: int, ctx: int, workdir: Path):
    """llama-cpp-python's OpenAI server in its own venv, or an error string."""
    from backend.bench.server import free_port
    ok = subprocess.run([python, "-c", "import llama_cpp.server, llama_cpp; print(llama_cpp.__version__)"],
                        capture_output=True, text=True)
    if ok.returncode != 0:
        return None, f"llama_cpp.server not importable by {python}: {ok.stderr.strip()[-200:]}"
    version = ok.stdout.strip()
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
           "--model_alias", "peer",
           # its default cuts a streaming answer short when the next request arrives (7 of 8 clients then got
           # empty answers); queued, every client is served in turn, as a user of it would configure it
           "--interrupt_requests", "False"]
    return wait_for_peer(cmd, port, workdir / "llama-cpp-python-server.log",
                         f"llama-cpp-python {version} llama_cpp.server (one request at a time), same GGUF, {threads} threads")


def start_native_llama_server(binary: str, gguf: str, threads: int, slots: int, ctx: int, workdir: Path):
    """llama.cpp's own llama-server with `slots` parallel slots (continuous batching), or an error string."""
    from backend.bench.server import free_port
    if not Path(binary).is_file():
        return None, f"llama-server: no such file {binary}"
    ver = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version = (ver.stdout + ver.stderr).strip().splitlines()[0] if (ver.stdout + ver.stderr).strip() else "?"
    port = free_port()
    cmd = [binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
           "--threads-batch", str(threads), "--parallel", str(slots), "--ctx-size", str(ctx * slots),
           "--cont-batching", "--alias", "peer"]
    return wait_for_peer(cmd, port, workdir / "llama-server.log",
                         f"llama.cpp llama-server ({version}), {slots} parallel slots, same GGUF, {threads} threads")


def wait_for_peer(cmd: list[str], port: int, log_path: Path, name: str):
    """Start a peer server and wait for its /v1/models: ((proc, url, name), None) or (None, error)."""
    import httpx
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"{cmd[0]} exited with {proc.returncode}: see {log_path}"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return (proc, url, name), None
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    return None, f"{cmd[0]} did not start within 120 s"


def result(metric, unit, ours, peer, peer_name, goal, higher_is_better=True, **extra) -> dict:
    ratio = None
    if ours is not None and peer:
        ratio = ours / peer if higher_is_better else peer / ours
    return {"metric": metric, "unit": unit, "ours": None if ours is None else round(ours, 3),
            "peer": None if peer is None else round(peer, 3), "peer_name": peer_name,
            "ratio": None if ratio is None else round(ratio, 3), "goal_ratio": goal, **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m backend.bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python[server] (side venv)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (built from source)")
    ap.add_argument("--peer-slots", type=int, default=None, help="llama-server's parallel slots (default: the most clients)")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every level on every server (median reported)")
    ap.add_argument("--app-args", default="", help="more flags for our app.py, e.g. '--kernel-activations int8'")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]

    import os

    from backend.bench.server import start_app, stop_app
    root = Path(__file__).resolve().parents[2]
    cache = Path(os.environ.get("PLAYGROUND_CACHE_DIR") or root / "data" / "cache")
    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    # Every server is started first, then measured in turns (each level on each server, --repeat rounds), so
    # a slow spell of a shared machine falls on all of them alike; a level's figure is its median-rate round.
    servers: list[tuple[str, str, str, subprocess.Popen]] = []  # (name, url, model, process)
    errors: list[str] = []
    try:
        if not args.skip_ours:
            # one script plays every client from one address: lift the per-caller limit (backend/fairness.py)
            proc, url = start_app(tmp.name, cache, args.threads, "--max-batch", str(max(levels)),
                                  "--max-requests-per-user", str(2 * max(levels)), *args.app_args.split())
            servers.append(("ours", url, args.model, proc))
        from models.gguf_file import find_smollm2_gguf
        gguf = str(find_smollm2_gguf())
        starts = [(args.llama_python, lambda: start_llama_server(args.llama_python, gguf, args.threads, 4096, Path(tmp.name))),
                  (args.llama_server, lambda: start_native_llama_server(args.llama_server, gguf, args.threads,
                                                                        args.peer_slots or max(levels), 2048, Path(tmp.name)))]
        for given, start in starts:
            if given:
                started, err = start()
                if err:
                    print(err)
                    errors.append(err)
                else:
                    lproc, lurl, name = started
                    servers.append((name, lurl, "peer", lproc))
        rounds: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name, *_ in servers}
        for name, url, model, _ in servers:
            run_level(url, model, 2, 8)  # warm-up
        for r in range(args.repeat):
            for c in levels:
                for name, url, model, _ in servers:
                    f = run_level(url, model, c, args.tokens, round_no=r + 1)
                    rounds[name][c].append(f)
                    print(f"round {r + 1}, {name}, {c} clients: {f['tok_s']:.1f} tok/s aggregate, first token p50 "
                          f"{f['ttft_p50']:.2f} s / p99 {f['ttft_p99']:.2f} s / worst {f['ttft_max']:.2f} s, "
                          f"inter-token p99 {f['itl_p99'] or 0:.3f} s, failed {f['failed']} {f['errors']}", flush=True)
    finally:
        for name, _, _, proc in servers:
            if name == "ours":
                stop_app(proc)
            else:
                proc.terminate()
                proc.wait(20)

    def median_round(fs: list[dict]) -> dict:
        return sorted(fs, key=lambda f: f["tok_s"])[len(fs) // 2]

    ours = {c: median_round(fs) for c, fs in rounds.get("ours", {}).items()}
    peers: list[tuple[str, dict[int, dict]]] = [(name, {c: median_round(fs) for c, fs in by_level.items()})
                                                for name, by_level in rounds.items() if name != "ours"]
    peers += [(err, {}) for err in errors]
    if not peers:
        peers.append(("llama.cpp server: not measured (pass --llama-python PY and/or --llama-server BIN)", {}))

    results = []
    one = ours.get(1)
    for c in levels:
        o = ours.get(c)
        for peer_name, figures in peers:
            p = figures.get(c)
            results.append(result(f"{c} clients: aggregate decode", "tok/s", o and o["tok_s"], p and p["tok_s"],
                                  peer_name, {1: 1.2, 8: 1.5}.get(c), **({} if o is None else {
                                      "ttft_p50_s": round(o["ttft_p50"], 3), "ttft_p99_s": round(o["ttft_p99"], 3),
                                      "ttft_max_s": round(o["ttft_max"], 3),
                                      "itl_p99_s": None if o["itl_p99"] is None else round(o["itl_p99"], 4),
                                      "tokens": o["tokens"]}),
                                  **({} if p is None else {"peer_ttft_max_s": round(p["ttft_max"], 3)})))
        if one and o and c > 1:
            results.append(result(f"{c} clients vs 1 client (scaling)", "x", o["tok_s"] / one["tok_s"], None,
                                  "no peer: ours at 1 client is the baseline", {8: 3.0, 32: 4.0}.get(c),
                                  goal_min=({8: 3.0, 32: 4.0}.get(c))))
    import torch
    print(json.dumps({"bench": "serve", "device": "cpu", "threads": args.threads, "tokens": args.tokens,
                      "app_args": args.app_args,
                      "openmp": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}, "torch": torch.__version__.split("+")[0],
                      "results": results}))


if __name__ == "__main__":
    main()
