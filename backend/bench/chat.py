"""python -m backend.bench chat [--parts sandbox,http] [--calls 30] [--runs 5] [--tokens 64] [--threads 2]

Parts (each a function returning result rows; the last line of output is one JSON object with all rows):
- sandbox: start-up overhead of one Python tool call. Ours: `run_python(code)` (bwrap namespaces, per-call
  cgroups, rlimits, pipes read with caps, full teardown). Peer: a plain `subprocess.run([python, "-I", "-S",
  "-c", code])` of the same interpreter, in the same run, same code. Both warmed up, then interleaved call by
  call so machine load hits both alike; medians reported. The overhead (ours - peer) is what isolation costs.
- http: time to first token and decode tokens/s of a chat answer through the HTTP API with the bundled model.
  Ours: a real server (`python app.py`, its own process, same --threads) streamed through the official
  `openai` client (SSE, /v1/chat/completions, greedy, a fixed prompt). Peer: the same model in an Engine
  in this process, `Engine.generate` on the same rendered prompt, streamed through `aiterate` (a worker
  thread, as the server decodes) but with no HTTP, SSE, JSON or client. The difference is what that layer costs. Runs alternate between the two; medians reported.
  Time to first token includes the prompt's prefill on both sides; tokens/s counts tokens after the
  first one over the time after the first one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from backend.bench.server import start_app
from backend.tools.sandbox import SandboxLimits, isolation, python_prefix, run_python

CODE = "print(sum(range(1000)))"


def bench_sandbox(args) -> list[dict]:
    iso = isolation()
    limits = SandboxLimits(allow_unisolated=not iso["bwrap"])
    exe = str(python_prefix()[1])

    def ours() -> float:
        t0 = time.perf_counter()
        r = run_python(CODE, limits)
        dt = time.perf_counter() - t0
        assert r.stdout == "499500\n", r
        return dt

    def peer() -> float:
        t0 = time.perf_counter()
        p = subprocess.run([exe, "-I", "-S", "-c", CODE], capture_output=True, timeout=30)
        dt = time.perf_counter() - t0
        assert p.stdout == b"499500\n", p
        return dt

    for _ in range(3):
        ours(), peer()
    a, b = [], []
    for i in range(args.calls):
        a.append(ours())
        b.append(peer())
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{args.calls} calls: sandbox {statistics.median(a) * 1e3:.1f} ms, "
                  f"plain {statistics.median(b) * 1e3:.1f} ms", flush=True)
    ours_ms, peer_ms = statistics.median(a) * 1e3, statistics.median(b) * 1e3
    guard = run_python("pass", limits).guard
    print(f"sandbox call: {ours_ms:.1f} ms median (p90 {sorted(a)[int(0.9 * len(a))] * 1e3:.1f}), plain subprocess "
          f"{peer_ms:.1f} ms: isolation costs {ours_ms - peer_ms:.1f} ms per call")
    print("guards: " + ", ".join(guard))
    return [{"metric": "python tool call (start-up + teardown)", "unit": "ms", "ours": round(ours_ms, 2),
             "peer": round(peer_ms, 2), "peer_name": "subprocess.run([python, -I, -S, -c, code])",
             "ratio": round(peer_ms / ours_ms, 3), "goal_ratio": None,
             "overhead_ms": round(ours_ms - peer_ms, 2), "calls": args.calls, "isolated": iso["bwrap"],
             "guard": guard}]


CHAT_PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def bench_http(args) -> list[dict]:
    import os
    import tempfile
    from pathlib import Path

    import asyncio

    import openai
    import torch

    from backend.config import AppConfig
    from backend.serving.engine import aiterate
    from backend.serving.model_pool import EnginePool
    from backend.serving.sampling import SamplingParams
    from models.registry import BUNDLED_NAME, ModelRegistry

    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parents[2]
    cache = Path(os.environ.get("PLAYGROUND_CACHE_DIR") or root / "data" / "cache")
    tmp = tempfile.TemporaryDirectory(prefix="bench-chat-")
    proc, url = start_app(tmp.name, cache, args.threads)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        cfg = AppConfig(data_dir=Path(tmp.name) / "inproc", cache_dir=cache, threads=args.threads)
        cfg.ensure_dirs()
        engine = EnginePool(ModelRegistry(cfg), cfg).get(BUNDLED_NAME)
        prompt = engine.chat_prompt(CHAT_PROMPT)
        params = SamplingParams(temperature=0, max_tokens=args.tokens, stop_token_ids=engine.default_stop_ids())

        def ours() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            first = None
            n = 0
            stream = client.chat.completions.create(model=BUNDLED_NAME, messages=CHAT_PROMPT, max_tokens=args.tokens,
                                                    temperature=0, stream=True, stream_options={"include_usage": True})
            for ch in stream:
                if ch.choices and ch.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if ch.usage is not None:
                    n = ch.usage.completion_tokens
            end = time.perf_counter()
            return first - t0, (n - 1) / (end - first), n

        async def consume(t0: float) -> tuple[float, float, int]:
            first, n = None, 0
            async for ev in aiterate(engine.generate([prompt], params)):
                if ev.token_id is not None:
                    n += 1
                if ev.text and first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            return first - t0, (n - 1) / (end - first), n

        def peer() -> tuple[float, float, int]:
            # Decoding runs in a worker thread through aiterate, exactly as the server runs it, so the only
            # difference left is HTTP + SSE + JSON + the client. (Measured: under CPU contention a decode
            # loop on the main thread with 2 torch threads ran several times slower than in a worker thread.)
            return asyncio.run(consume(time.perf_counter()))

        ours(), peer()  # warm up both
        a, b = [], []
        for i in range(args.runs):
            a.append(ours())
            b.append(peer())
            print(f"  run {i + 1}/{args.runs}: HTTP ttft {a[-1][0] * 1e3:.0f} ms, {a[-1][1]:.1f} tok/s ({a[-1][2]} tokens) | "
                  f"in-process ttft {b[-1][0] * 1e3:.0f} ms, {b[-1][1]:.1f} tok/s ({b[-1][2]} tokens)", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        tmp.cleanup()
    ttft_o, ttft_p = (statistics.median(x[0] for x in v) * 1e3 for v in (a, b))
    rate_o, rate_p = (statistics.median(x[1] for x in v) for v in (a, b))
    print(f"time to first token: HTTP {ttft_o:.0f} ms vs in-process {ttft_p:.0f} ms (HTTP/SSE adds {ttft_o - ttft_p:.0f} ms); "
          f"decode: HTTP {rate_o:.1f} tok/s vs in-process {rate_p:.1f} tok/s")
    common = {"peer_name": "Engine.generate in-process via aiterate (same model, prompt, threads; no HTTP)", "goal_ratio": None,
              "runs": args.runs, "max_tokens": args.tokens, "prompt_tokens": len(prompt), "model": BUNDLED_NAME}
    return [{"metric": "chat time to first token (HTTP SSE, openai client)", "unit": "ms", "ours": round(ttft_o, 1),
             "peer": round(ttft_p, 1), "ratio": round(ttft_p / ttft_o, 3), "overhead_ms": round(ttft_o - ttft_p, 1), **common},
            {"metric": "chat decode rate (HTTP SSE, openai client)", "unit": "tok/s", "ours": round(rate_o, 2),
             "peer": round(rate_p, 2), "ratio": round(rate_o / rate_p, 3), **common}]


PARTS = {"sandbox": bench_sandbox, "http": bench_http}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend.bench chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--calls", type=int, default=30, help="sandbox calls per side")
    p.add_argument("--runs", type=int, default=5, help="chat answers per side (http part)")
    p.add_argument("--tokens", type=int, default=64, help="max tokens per chat answer (http part)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, for the server and the in-process engine")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; available: {', '.join(PARTS)}")
    results = []
    for name in parts:
        print(f"== {name}", flush=True)
        results += PARTS[name](args)
    import torch
    print(json.dumps({"bench": "chat", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
