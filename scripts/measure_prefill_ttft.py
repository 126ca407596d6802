"""Time to first token of a 300-token prompt through the engine, per prefill weights, beside transformers.

    .venv/bin/python scripts/measure_prefill_ttft.py [--weights q4,bf16] [--repeat 5] [--threads 2] [--tokens 300]

One process loads the bundled model once per --prefill-weights value (EnginePool, as the app does; prefix
cache off, so every run prefills the whole prompt) and, if transformers is installed, LlamaForCausalLM in
bf16 from the HF-layout directory the registry caches. Each run is a served request (scheduler, prefill,
head, first token: Engine.complete with max_tokens=1); transformers runs its forward of the same ids on the
engines' compute thread (one OpenMP pool for all, backend/serving/compute_thread.py). After a warm-up of
each, the variants alternate run by run, --repeat rounds; the last line is JSON with the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="q4,bf16",
                    help="comma-separated prefill weights (auto, q4, bf16; 'float': the float32 forward, for comparison)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=300, help="prompt length")
    ap.add_argument("--skip-peer", action="store_true", help="no transformers run")
    ap.add_argument("--data-dir", default=None, help="data dir (default: a temp dir; set PLAYGROUND_CACHE_DIR to reuse a cache)")
    args = ap.parse_args()

    from backend.runtime import apply_runtime_env
    apply_runtime_env()
    import torch
    torch.set_num_threads(args.threads)
    from backend.bench.decode import PREFILL_TEXT
    from backend.config import AppConfig
    from backend.serving.model_pool import EnginePool
    from backend.serving.sampling import SamplingParams
    from backend.serving.scheduler import ServeConfig
    from models.registry import ModelRegistry

    tmp = tempfile.TemporaryDirectory(prefix="measure-ttft-")
    cfg = AppConfig(data_dir=Path(args.data_dir or tmp.name))
    runs = {}
    for w in args.weights.split(","):
        pool = EnginePool(ModelRegistry(cfg), cfg,
                          serve=ServeConfig(prefix_cache_mb=0, prefill_weights="q4" if w == "float" else w))
        eng = pool.get(MODEL)
        if w == "float":  # measurement only: the model's float32 forward, what main prefilled on without our kernel
            from backend.serving.prefill import Prefill
            eng._prefill, eng.prefill_weights = Prefill(eng.model, "float"), "float"
        print(f"engine --prefill-weights {w}: prefills on {eng.prefill_weights} (decode: {eng.step.quant}, "
              f"{'our kernel' if eng.step.kernel else 'torch int4 kernel'})", flush=True)
        runs[f"ours {w} ({eng.prefill_weights})"] = eng
    first = next(iter(runs.values()))
    text = PREFILL_TEXT
    while len(first.chat_prompt([{"role": "user", "content": text}])) < args.tokens:
        text += " " + PREFILL_TEXT
    ids = first.chat_prompt([{"role": "user", "content": text}])[:args.tokens]
    one = SamplingParams(temperature=0, max_tokens=1)
    fns = {name: (lambda e=eng: e.complete(ids, one)[0].token_ids[0]) for name, eng in runs.items()}
    peer = "transformers: skipped (--skip-peer)"
    if not args.skip_peer:
        try:
            from transformers import LlamaForCausalLM
            hf = first.scheduler.compute.call(lambda: LlamaForCausalLM.from_pretrained(
                str(cfg.cache_dir / MODEL), dtype=torch.bfloat16).eval(), inference=False)
            x = torch.tensor([ids])

            def hf_first():
                return int(first.scheduler.call(lambda: hf(x, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()))
            peer = "transformers bf16 forward"
            fns[peer] = hf_first
        except ImportError as e:
            peer = f"transformers not installed: {e}"
    print(f"{len(ids)}-token prompt, {args.threads} threads; {peer}", flush=True)
    times = {name: [] for name in fns}
    firsts = {name: fn() for name, fn in fns.items()}  # warm-up; the first tokens
    print(f"first tokens: {firsts}", flush=True)
    for r in range(args.repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    med = {name: round(statistics.median(t), 3) for name, t in times.items()}
    print(json.dumps({"measure": f"time to first token, {len(ids)}-token prompt", "unit": "s",
                      "threads": args.threads, "repeat": args.repeat, "medians": med,
                      "all": {n: [round(x, 3) for x in t] for n, t in times.items()}}))


if __name__ == "__main__":
    main()
