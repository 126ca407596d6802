"""python -m backend.bench chat [--parts sandbox] [--calls 30]

Parts (each a function returning result rows; the last line of output is one JSON object with all rows):
- sandbox: start-up overhead of one Python tool call. Ours: `run_python(code)` (bwrap namespaces, per-call
  cgroups, rlimits, pipes read with caps, full teardown). Peer: a plain `subprocess.run([python, "-I", "-S",
  "-c", code])` of the same interpreter, in the same run, same code. Both warmed up, then interleaved call by
  call so machine load hits both alike; medians reported. The overhead (ours - peer) is what isolation costs.
- (time to first token and tokens/s of the chat through the HTTP API: added with the chat tab, as
  another entry of PARTS.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

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


PARTS = {"sandbox": bench_sandbox}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend.bench chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--calls", type=int, default=30, help="sandbox calls per side")
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
