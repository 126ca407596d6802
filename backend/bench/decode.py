"""python -m backend.bench decode [--threads 2] [--tokens 128] [--samples 8] [--sample-tokens 64] [--repeat 3]

Who is who, measured in one run with the same prompt, the same thread count and the same model weights:
- single-stream decode, greedy: OUR engine (backend.serving.engine, KV cache + DecodeStep) vs Hugging Face
  transformers `generate` with LlamaForCausalLM (float32) loaded from the HF-layout cache directory the
  registry writes for the bundled model, in a fresh child process (so no variant measured before it
  leaves it a used allocator). Both generate exactly --tokens new tokens (end-of-text ignored);
  the rate is new tokens / wall time of the whole call (prefill included, the prompt is ~40 tokens).
- N samples x T tokens of one prompt (temperature 1): our shared prefill + batched decode vs transformers
  `generate(do_sample=True, num_return_sequences=N)`.
- load time of the bundled model into an engine (weights + tokenizer): cold = a fresh cache directory
  (GGUF dequantization and tokenizer conversion included), warm = a new process reading the cache.
- our variants: gguf (the app's default on a CPU: decode matmuls on the GGUF file's own Q4_1/Q8_0 blocks
  through our block kernel, backend/serving/q4_kernel.cpp; prefill on --prefill-weights, as app.py), gguf-torch (the same blocks through
  torch's int4 kernel, bf16 activations: the fallback where ours cannot run), fp32 (PLAYGROUND_QUANT=none: float32 weights, exact to the
  reference), and opt-in bf16 weights (PLAYGROUND_DTYPE=bf16) and int8 (PLAYGROUND_QUANT=int8: int8 rows).
- agreement of each non-fp32 variant with the fp32 one, on a few chat prompts: teacher-forced along the
  fp32 greedy tokens, the share of steps whose top-1 token is the same and the max |logit diff|; and free
  running, how many greedy tokens match before the first divergence. (transformers cannot run Q4_1, so the
  peer is always fp32 on the dequantized weights; llama.cpp also quantizes activations, so no 4-bit
  engine is bit-exact with fp32.)
- llama.cpp on the same GGUF is the stretch peer (goal: at least half its single-stream rate), run greedy on
  our prompt's token ids in a child process of --llama-python (a venv with llama-cpp-python; it is no
  dependency of the app); both rates leave out the prefill (ours: new tokens after the first over their time;
  the prefill-included rate rides along); reported as missing when that
  Python cannot import `llama_cpp`, and refused when its first greedy token is not ours (a broken harness).
- decode at a long context (--long-context tokens of prompt, gguf variant): greedy decode rate (new tokens
  after the first / their time, prefill left out) against our own rate at the short prompt, measured
  interleaved in the same run (goal: the long rate >= 0.8x the short one); beside it, llama.cpp's own ratio on
  the same two prompts (`llama_cpp_ratio`, --llama-python).
- prefill: time to first token of a ~300-token prompt (goal <= 0.15 s and >= 2x transformers bf16); beside it,
  llama.cpp's prompt processing of the same ids (`llama_cpp_seconds`) and the ceiling: the prompt's model FLOPs
  (backend/train/metrics.py prefill_flops) over this CPU's int8 multiply-add rate measured with our kernel's
  own instructions and nothing else (q4_kernel.int8_peak_ops): `floor_seconds`, the least time any prefill
  built on them could take here, and `share_of_ceiling`, how much of it ours reaches.
Timings are the median of --repeat runs after a warm-up run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from backend.serving.q4_kernel import ACTIVATION_DIGITS
from backend.serving.scheduler import KV_CACHE_DTYPES, ServeConfig

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
AGREEMENT_PROMPTS = ["Write a short story about a robot who learns to paint.", "What is the capital of France?",
                     "Explain recursion in Python with an example.", "List three fruits and their colors."]
VARIANTS = {  # name -> (EnginePool quant, dtype)
    "fp32": ("none", torch.float32), "gguf": ("gguf", torch.float32), "gguf-torch": ("gguf-torch", torch.float32),
    "bf16": ("none", torch.bfloat16), "int8": ("int8", torch.float32)}


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decode_rate(engine, ids: list[int], tokens: int) -> float:
    """Greedy decode tok/s of one stream after its first token (the prompt's prefill left out)."""
    from backend.serving.sampling import SamplingParams
    first, count = None, 0
    for _ in engine.generate([ids], SamplingParams(temperature=0, max_tokens=tokens)):
        first = first or time.perf_counter()
        count += 1
    return (count - 1) / (time.perf_counter() - first)


def long_context_prompts(engine, context: int) -> tuple[list[int], list[int]]:
    short = engine.chat_prompt(PROMPT)
    text = " ".join(f"Fact {i}: pelicans can fly long distances over the sea." for i in range(context // 8))
    return short, engine.chat_prompt([{"role": "user", "content": text + " Summarize."}])[:context]


def long_context_rates(engine, context: int, tokens: int, repeat: int) -> tuple[float, float]:
    """(short-prompt, long-prompt) median decode rates, runs interleaved so load on the machine hits both."""
    short, long = long_context_prompts(engine, context)
    rates = [(_decode_rate(engine, short, tokens), _decode_rate(engine, long, tokens)) for _ in range(repeat + 1)][1:]
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def _warm_load_seconds(data_dir: Path, cache_dir: Path, model: str, threads: int) -> float:
    """Time EnginePool.get in a fresh process (imports excluded): what a restart of the app pays."""
    code = (
        "import time, torch\n"
        f"torch.set_num_threads({threads})\n"
        "from backend.config import AppConfig\nfrom backend.serving.model_pool import EnginePool\n"
        "from models.registry import ModelRegistry\n"
        f"cfg = AppConfig(data_dir={str(data_dir)!r}, cache_dir={str(cache_dir)!r})\n"
        "t0 = time.perf_counter()\n"
        f"EnginePool(ModelRegistry(cfg), cfg).get({model!r})\n"
        "print(time.perf_counter() - t0)\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def agreement(ref, eng, tokens: int, prompts: list[str] = AGREEMENT_PROMPTS) -> dict:
    """How closely engine `eng` decodes like `ref` (both on the same model): teacher-forced along ref's
    greedy tokens, the share of steps with the same top-1 token and the max |logit diff|; free running,
    the greedy tokens that match before the first divergence (per prompt)."""
    from backend.serving.kv_quant import cast
    from backend.serving.sampling import SamplingParams
    same = steps = 0
    worst = prefill_worst = 0.0
    prefill_same = 0
    same_prefix = []
    greedy = SamplingParams(temperature=0, max_tokens=tokens)
    with torch.inference_mode():
        for text in prompts:
            ids = ref.chat_prompt([{"role": "user", "content": text}])
            caches = [e.model.new_cache(1, len(ids) + tokens) for e in (ref, eng)]
            logits = [e.model(torch.tensor([ids], device=e.device), c, last_only=True)[:, -1].float()
                      for e, c in zip((ref, eng), caches)]
            for e, c in zip((ref, eng), caches):  # the float forward filled them; the step reads its own dtype
                c.k, c.v = [cast(t, e.kv_dtype) for t in c.k], [cast(t, e.kv_dtype) for t in c.v]
            # the engine's own prefill (bf16 matmuls where it chose them) and head, as it serves a request
            served = eng.head(eng.prefill_hidden(ids, eng.new_cache(1, len(ids)))[:, -1]).float().cpu()
            prefill_worst = max(prefill_worst, (logits[0].cpu() - served).abs().max().item())
            prefill_same += int(logits[0].argmax() == served.argmax())
            for _ in range(tokens):
                tok = logits[0].argmax(-1)
                logits = [e.step(tok.to(e.device), c).float().cpu() for e, c in zip((ref, eng), caches)]
                same += int(logits[0].argmax() == logits[1].argmax())
                steps += 1
                worst = max(worst, (logits[0] - logits[1]).abs().max().item())
            a, b = ref.complete(ids, greedy)[0].token_ids, eng.complete(ids, greedy)[0].token_ids
            same_prefix.append(matched(a, b))
    return {"top1_agreement": round(same / steps, 4), "max_abs_logit_diff": round(worst, 3),
            "prefill_top1_agreement": round(prefill_same / len(prompts), 4),
            "prefill_max_abs_logit_diff": round(prefill_worst, 3),
            "greedy_tokens_matched": same_prefix, "prompts": len(prompts), "tokens": tokens}


# The peers run in child processes: each starts as fresh as ours did (no allocator or cache state left
# by the variants measured before it), and llama.cpp lives in its own venv.
CHILD_PRELUDE = """
import json, statistics, sys, time
args = json.loads(sys.argv[1])
def median_time(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)
"""

HF_PEER = CHILD_PRELUDE + """
import torch
try:
    from transformers import LlamaForCausalLM
except ImportError as e:
    print(json.dumps({"error": f"transformers not installed: {e}"}))
    raise SystemExit
torch.set_num_threads(args["threads"])
hf = LlamaForCausalLM.from_pretrained(args["dir"], dtype=torch.float32).eval()
ids = torch.tensor([args["prompt"]])
attn = torch.ones_like(ids)
def greedy():
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=attn, do_sample=False, min_new_tokens=args["tokens"],
                           max_new_tokens=args["tokens"], pad_token_id=0)
def sampled():
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           num_return_sequences=args["samples"], min_new_tokens=args["sample_tokens"],
                           max_new_tokens=args["sample_tokens"], pad_token_id=0)
tokens = greedy()[0, len(args["prompt"]):].tolist()
single = args["tokens"] / median_time(greedy, args["repeat"])
batch = args["samples"] * args["sample_tokens"] / median_time(sampled, args["repeat"])
print(json.dumps({"single": single, "batch": batch, "tokens": tokens}))
"""

HF_PREFILL = CHILD_PRELUDE + """
import torch
try:
    from transformers import LlamaForCausalLM
except ImportError as e:
    print(json.dumps({"error": f"transformers not installed: {e}"}))
    raise SystemExit
torch.set_num_threads(args["threads"])
hf = LlamaForCausalLM.from_pretrained(args["dir"], dtype=torch.bfloat16).eval()
ids = torch.tensor([args["prompt"]])
def first_token():
    with torch.inference_mode():
        return hf(ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()
print(json.dumps({"seconds": median_time(first_token, args["repeat"])}))
"""

LLAMA_PRELUDE = CHILD_PRELUDE + """
try:
    import llama_cpp
    import numpy as np
except ImportError as e:
    print(json.dumps({"error": f"llama.cpp (llama-cpp-python) not importable by {sys.executable}: {e}"}))
    raise SystemExit
def open_llama(n_ctx, **kw):
    return llama_cpp.Llama(model_path=args["gguf"], n_threads=args["threads"], n_threads_batch=args["threads"],
                           n_ctx=n_ctx, verbose=False, **kw)
def last_logits(llm):  # llm.scores is only filled with logits_all=True (llama-cpp-python 0.3.36)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
"""

LLAMA_CPP = LLAMA_PRELUDE + """
prompt, tokens = args["prompt"], args["tokens"]
llm = open_llama(max(512, len(prompt) + tokens + 1))
def run(out):
    llm.reset()  # no prompt cache between runs
    for t in prompt:  # a token at a time: its batched (AMX) matmul crashed on this CPU (llama-cpp-python 0.3.36)
        llm.eval([t])
    t0 = time.perf_counter()
    for _ in range(tokens):  # greedy, past end-of-text like ours
        out.append(int(np.argmax(last_logits(llm))))
        llm.eval([out[-1]])
    return time.perf_counter() - t0
ids = []
run(ids)
seconds = statistics.median(run([]) for _ in range(args["repeat"]))
print(json.dumps({"tok_s": tokens / seconds, "tokens": ids, "version": llama_cpp.__version__}))
"""

LLAMA_PREFILL = LLAMA_PRELUDE + """
llm = open_llama(512, n_batch=512, n_ubatch=512)
def prefill():
    llm.reset()  # no prompt cache between runs
    llm.eval(args["prompt"])  # one batch: llama.cpp's own prompt processing
print(json.dumps({"seconds": median_time(prefill, args["repeat"]), "version": llama_cpp.__version__}))
"""

LLAMA_LONG = LLAMA_PRELUDE + """
llm = open_llama(len(args["long"]) + args["tokens"] + 8, n_batch=512)
def rate(prompt):  # greedy decode only, after the prompt, as ours is timed
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(args["tokens"]):
        llm.eval([int(np.argmax(last_logits(llm)))])
    return args["tokens"] / (time.perf_counter() - t0)
rates = [(rate(args["short"]), rate(args["long"])) for _ in range(args["repeat"] + 1)][1:]
print(json.dumps({"short": statistics.median(r[0] for r in rates), "long": statistics.median(r[1] for r in rates)}))
"""

def run_child(python: str, code: str, args: dict, what: str) -> dict:
    """A peer's JSON line from `python -c code json(args)`, or {"error": why}."""
    try:
        out = subprocess.run([python, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=1800,
                             check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return {"error": f"{what} run failed (exit {out.returncode}): {out.stderr.strip()[-300:]}"}
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return {"error": f"{what} run failed: {e}"}


def matched(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy decodes share before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def result(metric, unit, ours, peer, peer_name, goal, higher_is_better=True, **extra) -> dict:
    ratio = None
    if peer is not None and ours:
        ratio = round(ours / peer if higher_is_better else peer / ours, 2)
    return {"metric": metric, "unit": unit, "ours": None if ours is None else round(ours, 2),
            "peer": None if peer is None else round(peer, 2), "peer_name": peer_name, "ratio": ratio,
            "goal_ratio": goal, **extra}


def constraint_cost(engine, prompt: list[int], tokens: int, repeat: int, variant: str) -> dict:
    """Single-stream greedy decode held to a JSON schema by llguidance (backend/serving/structured.py: a mask over
    the vocabulary before each draw, the matcher advanced after it) against the same decode unconstrained;
    both make exactly `tokens` tokens (no stop tokens: once the JSON is complete only <|im_end|> is left)."""
    from dataclasses import replace

    from backend.serving.sampling import SamplingParams
    from backend.serving.structured import json_constraint
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    plain = SamplingParams(temperature=0, max_tokens=tokens)
    held = replace(plain, constraint=json_constraint(engine, schema, engine.default_stop_ids()))
    free_t = _median_time(lambda: engine.complete(prompt, plain), repeat)
    held_t = _median_time(lambda: engine.complete(prompt, held), repeat)
    print(f"ours [{variant}] single-stream greedy with a JSON-schema constraint: {tokens / held_t:.1f} tok/s "
          f"(unconstrained {tokens / free_t:.1f} tok/s; {1000 * (held_t - free_t) / tokens:.2f} ms per token)")
    return result(f"single-stream decode [{variant}] with a JSON-schema constraint (llguidance)", "tok/s",
                  tokens / held_t, tokens / free_t, "the same decode unconstrained", 0.9,
                  ms_per_token=round(1000 * (held_t - free_t) / tokens, 3))


PREFILL_TEXT = " ".join(f"Note {i}: the pelican flew over the harbour at dawn and counted the boats." for i in range(24))


def prefill_row(args, cfg) -> dict:
    """Time to first token of a ~300-token prompt, as a request is served (the app's default engine:
    scheduler, prefill, head, first sample) against transformers' bf16 forward of the same ids."""
    from backend.serving.model_pool import EnginePool
    from backend.serving.sampling import SamplingParams
    from models.registry import ModelRegistry
    engine = EnginePool(ModelRegistry(cfg), cfg, serve=_no_prefix_cache(args)).get(args.model)
    ids = (engine.chat_prompt([{"role": "user", "content": PREFILL_TEXT}]) if engine.spec.chat_format
           else engine.encode(PREFILL_TEXT))[:300]
    one = SamplingParams(temperature=0, max_tokens=1)
    t = _median_time(lambda: engine.complete(ids, one), args.repeat)
    print(f"ours: {len(ids)}-token prompt, time to first token {t:.3f} s (prefill weights: {engine.prefill_weights}, "
          f"--prefill-weights {args.prefill_weights})")
    peer, name = None, "transformers forward (bf16)"
    if not args.skip_peer:
        spec = ModelRegistry(cfg).get(args.model)
        hf_dir = (cfg.cache_dir / args.model) if spec.kind == "bundled" else spec.path
        hf = run_child(sys.executable, HF_PREFILL, {"dir": str(hf_dir), "threads": args.threads,
                                                      "repeat": args.repeat, "prompt": ids}, "transformers prefill")
        if "error" in hf:
            name = hf["error"]
        else:
            peer = hf["seconds"]
            print(f"transformers bf16 forward of the same {len(ids)} ids: {peer:.3f} s")
    else:
        name = "skipped (--skip-peer)"
    extra = prefill_ceiling(engine, cfg, len(ids), t, args.threads)
    if spec_gguf(engine):  # llama.cpp's own prompt processing of the same ids, same GGUF
        got = run_child(args.llama_python or sys.executable, LLAMA_PREFILL, {"gguf": spec_gguf(engine), "threads":
                        args.threads, "repeat": args.repeat, "prompt": ids}, "llama.cpp prefill")
        extra["llama_cpp_seconds"] = round(got["seconds"], 3) if "seconds" in got else got["error"]
        print(f"llama.cpp prefill of the same {len(ids)} ids: " +
              (f"{got['seconds']:.3f} s" if "seconds" in got else got["error"]))
    return result(f"prefill {len(ids)} tokens: time to first token", "s", t, peer, name, 2.0,
                  higher_is_better=False, goal_seconds=0.15, prefill_weights=engine.prefill_weights, **extra)


def spec_gguf(engine) -> str | None:
    """The GGUF file the bundled model is read from (llama.cpp's input); None for other models."""
    return str(engine.spec.path) if engine.spec.kind == "bundled" else None


def prefill_ceiling(engine, cfg, tokens: int, seconds: float, threads: int) -> dict:
    """The prompt's model FLOPs (backend/train/metrics.py prefill_flops) against this CPU's ceiling for our
    kernels' int8 multiply-adds (q4_kernel.int8_peak_ops): the least time a prefill built on them could take
    here, and the share of that ceiling ours reaches. Where our kernel does not run, nothing is claimed."""
    from backend.serving import q4_kernel
    from backend.train.metrics import prefill_flops
    flops = prefill_flops(engine.model.cfg, tokens)
    lib = q4_kernel.load(cfg.cache_dir / "kernels")
    if lib is None:
        return {"model_gflop": round(flops / 1e9, 2)}
    peak = q4_kernel.int8_peak_ops(lib, threads)
    floor = flops / peak
    print(f"{tokens} tokens = {flops / 1e9:.1f} GFLOP; this CPU's int8 multiply-add ceiling ({q4_kernel.variant()} "
          f"build, {threads} threads, no memory traffic): {peak / 1e9:.0f} GOP/s, so at least {floor:.3f} s "
          f"(goal 0.15 s); ours reaches {100 * floor / seconds:.0f}% of that ceiling")
    return {"model_gflop": round(flops / 1e9, 2), "int8_peak_gops": round(peak / 1e9, 1),
            "floor_seconds": round(floor, 3), "share_of_ceiling": round(floor / seconds, 3)}


def _no_prefix_cache(args):
    # every repeat prefills the whole prompt
    return ServeConfig(prefix_cache_mb=0, kv_cache_dtype=args.kv_cache_dtype, prefill_weights=args.prefill_weights,
                       kernel_activations=args.kernel_activations)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m backend.bench decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens in the single-stream run")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sample-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default=None, help="where the bundled model's cache lives (default: a temp dir)")
    ap.add_argument("--skip-peer", action="store_true", help="only our numbers (no transformers run)")
    ap.add_argument("--variants", default="fp32,gguf",
                    help="our engine variants: fp32, gguf (the CPU default: the GGUF's 4-bit blocks), gguf-torch, bf16, int8")
    ap.add_argument("--agreement-tokens", type=int, default=64, help="decode steps per prompt in the agreement check")
    ap.add_argument("--long-context", type=int, default=1500,
                    help="prompt tokens of the long-context decode row (gguf variant; 0 skips it)")
    ap.add_argument("--long-context-tokens", type=int, default=64, help="new tokens per run of the long-context row")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="the engine's KV cache (as app.py --kv-cache-dtype)")
    ap.add_argument("--prefill-weights", choices=("auto", "bf16", "q4"), default="auto",
                    help="what the 4-bit variants prefill on (as app.py --prefill-weights): every row, the prefill row included")
    ap.add_argument("--kernel-activations", choices=tuple(ACTIVATION_DIGITS), default=ServeConfig.kernel_activations,
                    help="how the 4-bit kernel rounds its inputs (as app.py --kernel-activations): every row")
    ap.add_argument("--skip-load", action="store_true", help="skip the cold/warm load timing")
    ap.add_argument("--skip-constraint", action="store_true", help="skip the constrained-decoding row")
    ap.add_argument("--llama-python", default=None,
                    help="a Python with llama-cpp-python installed, for the llama.cpp peer (default: this one)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from backend.config import AppConfig
    from backend.serving.compute_thread import run_in_short_thread
    from backend.serving.model_pool import EnginePool
    from backend.serving.sampling import SamplingParams
    from models.registry import ModelRegistry

    tmp = tempfile.TemporaryDirectory(prefix="bench-decode-")
    data_dir = Path(args.data_dir or tmp.name)
    cold_cache = Path(tmp.name) / "cold-cache"
    results = []

    # -- load times ------------------------------------------------------------------------------
    cache_dir = Path(tmp.name) / "cache" if args.data_dir is None else None
    if not args.skip_load and args.model == "smollm2-135m-instruct":
        cfg = AppConfig(data_dir=data_dir, cache_dir=cold_cache)
        t0 = time.perf_counter()
        EnginePool(ModelRegistry(cfg), cfg).get(args.model)
        cold = time.perf_counter() - t0
        warm = _warm_load_seconds(data_dir, cold_cache, args.model, args.threads)
        cache_dir = cold_cache
        print(f"load {args.model}: cold {cold:.2f} s (GGUF dequantization + tokenizer conversion), warm {warm:.2f} s")
        results.append(result("load time cold (fresh cache)", "s", cold, None, "no peer: one-time conversion",
                              None, higher_is_better=False))
        results.append(result("load time warm (new process, cached)", "s", warm, None,
                              "no peer; goal: warm <= 3 s", None, higher_is_better=False, goal_seconds=3.0))
    cfg = AppConfig(data_dir=data_dir, cache_dir=cache_dir) if cache_dir else AppConfig(data_dir=data_dir)
    ours = {}  # variant -> (single tok/s, batch tok/s, greedy token ids, agreement with fp32 or None)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown} (choose from {', '.join(VARIANTS)})")
    if "fp32" in variants:  # the reference the other variants' agreement is measured against: first
        variants.remove("fp32")
        variants.insert(0, "fp32")
    ref = None
    for variant in variants:
        quant, dtype = VARIANTS[variant]
        pool = EnginePool(ModelRegistry(cfg), cfg, quant=quant, dtype=dtype,
                          serve=ServeConfig(kv_cache_dtype=args.kv_cache_dtype, prefill_weights=args.prefill_weights,
                                            kernel_activations=args.kernel_activations))
        engine = pool.get(args.model)
        prompt = engine.chat_prompt(PROMPT) if engine.spec.chat_format else engine.encode(PROMPT[0]["content"])
        print(f"ours [{variant}]: {args.model} on {engine.device} ({engine.model.dtype}, decode weights: "
              f"{engine.step.quant or 'float'}), {args.threads} threads, prompt {len(prompt)} tokens")
        greedy = SamplingParams(temperature=0, max_tokens=args.tokens)  # no stop tokens: exactly --tokens
        ids = engine.complete(prompt, greedy)[0].token_ids
        t = _median_time(lambda: engine.complete(prompt, greedy), args.repeat)
        single = args.tokens / t
        print(f"ours [{variant}] single-stream greedy: {single:.1f} tok/s ({args.tokens} tokens in {t:.2f} s)")
        # decode only (after the first token), as llama.cpp's row is timed: like against like
        decode_only = statistics.median([_decode_rate(engine, prompt, args.tokens) for _ in range(args.repeat + 1)][1:])
        print(f"ours [{variant}] single-stream greedy, decode only: {decode_only:.1f} tok/s")
        sampled = SamplingParams(temperature=1.0, max_tokens=args.sample_tokens, seed=0)
        t = _median_time(lambda: engine.complete(prompt, sampled, n=args.samples), args.repeat)
        batch = args.samples * args.sample_tokens / t
        print(f"ours [{variant}] {args.samples} x {args.sample_tokens} sampled: {batch:.1f} tok/s ({t:.2f} s)")
        if variant == variants[-1] and not args.skip_constraint:
            results.append(constraint_cost(engine, prompt, args.tokens, args.repeat, variant))
        agree = None
        if variant == "fp32":
            ref = engine
        elif ref is not None and engine.spec.chat_format:
            # on a short-lived thread: torch ops on this one would leave a second OpenMP pool that slows
            # the engines' own thread from then on (backend/serving/compute_thread.py)
            agree = run_in_short_thread(lambda: agreement(ref, engine, args.agreement_tokens))
            print(f"ours [{variant}] vs fp32: {agree}")
        ours[variant] = (single, batch, ids, agree, decode_only)
        if variant == "gguf" and args.long_context:
            short_rate, long_rate = long_context_rates(engine, args.long_context, args.long_context_tokens, args.repeat)
            print(f"ours [{variant}] decode at {args.long_context} tokens of context: {long_rate:.1f} tok/s, "
                  f"at {len(prompt)}: {short_rate:.1f} tok/s")
            extra = {}
            if spec_gguf(engine):  # llama.cpp's own ratio on the same prompts: what the best CPU engine keeps
                short_ids, long_ids = long_context_prompts(engine, args.long_context)
                got = run_child(args.llama_python or sys.executable, LLAMA_LONG,
                                {"gguf": spec_gguf(engine), "threads": args.threads, "tokens": args.long_context_tokens,
                                 "repeat": args.repeat, "short": short_ids, "long": long_ids}, "llama.cpp long context")
                extra["llama_cpp_ratio"] = round(got["long"] / got["short"], 3) if "long" in got else got["error"]
                print("llama.cpp on the same prompts: " + (f"{got['long']:.1f} tok/s at {len(long_ids)}, "
                      f"{got['short']:.1f} at {len(short_ids)}: {got['long'] / got['short']:.2f}" if "long" in got
                      else got["error"]))
            results.append(result(f"decode at {args.long_context} tokens of context vs short [{variant}]", "tok/s",
                                  long_rate, short_rate, f"ours at a {len(prompt)}-token prompt, same run", 0.8,
                                  **extra))
        if engine is not ref:
            engine.close()
        del pool, engine

    # -- transformers ----------------------------------------------------------------------------
    hf_single = hf_batch = None
    hf_name = "transformers generate (fp32)"
    same_greedy = None
    if args.skip_peer:
        hf_name = "skipped (--skip-peer)"
    else:
        spec = ModelRegistry(cfg).get(args.model)
        hf_dir = (cfg.cache_dir / args.model) if spec.kind == "bundled" else spec.path
        hf = run_child(sys.executable, HF_PEER, {"dir": str(hf_dir), "threads": args.threads, "tokens": args.tokens,
                                                  "samples": args.samples, "sample_tokens": args.sample_tokens,
                                                  "repeat": args.repeat, "prompt": prompt}, "transformers")
        if "error" in hf:
            hf_name = hf["error"]
            print(hf_name)
        else:
            hf_single, hf_batch = hf["single"], hf["batch"]
            same_greedy = {v: hf["tokens"] == o[2] for v, o in ours.items()}
            print(f"transformers single-stream greedy: {hf_single:.1f} tok/s; same tokens as ours: {same_greedy}")
            print(f"transformers {args.samples} x {args.sample_tokens} sampled: {hf_batch:.1f} tok/s")

    for variant, (single, batch, _, agree, _) in ours.items():
        tag = f" [{variant}]"
        results.append(result(f"single-stream decode (greedy){tag}", "tok/s", single, hf_single, hf_name, 2.0,
                              same_greedy_tokens=None if same_greedy is None else same_greedy[variant]))
        results.append(result(f"{args.samples} samples x {args.sample_tokens} tokens{tag}", "tok/s", batch, hf_batch,
                              hf_name.replace("(fp32)", "batched (fp32)"), 3.0))
        if agree is not None:
            results.append(result(f"agreement with fp32{tag}: teacher-forced top-1", "fraction", agree["top1_agreement"],
                                  None, "no peer: the variant against our float32 decode", None, **agree))
    results.append(prefill_row(args, cfg))
    best = max(ours, key=lambda v: ours[v][4])  # by the decode-only rate it is compared on
    llama = {"error": "llama.cpp: only measured on the bundled GGUF"}
    if args.model == "smollm2-135m-instruct":
        from models.gguf_file import find_smollm2_gguf
        llama = run_child(args.llama_python or sys.executable, LLAMA_CPP,
                          {"gguf": str(find_smollm2_gguf()), "threads": args.threads, "tokens": args.tokens,
                           "repeat": args.repeat, "prompt": prompt}, "llama.cpp")
    if "error" not in llama and matched(llama["tokens"], ours[best][2]) == 0:  # not even the first token: broken
        llama = {"error": f"llama.cpp's first greedy token {llama['tokens'][:1]} is not ours "
                          f"{ours[best][2][:1]}: its harness is broken, no ratio reported"}
    if "error" in llama:
        print(llama["error"])
        results.append(result(f"single-stream decode [{best}] vs llama.cpp, decode only", "tok/s", ours[best][4], None,
                              llama["error"], 0.5))
    else:
        same = {v: matched(llama["tokens"], o[2]) for v, o in ours.items()}
        print(f"llama-cpp-python {llama['version']} single-stream greedy: {llama['tok_s']:.1f} tok/s (decode only); "
              f"greedy tokens the same as ours before the first difference: {same}")
        results.append(result(f"single-stream decode [{best}] vs llama.cpp, decode only", "tok/s", ours[best][4],
                              llama["tok_s"], f"llama-cpp-python {llama['version']} on the same GGUF, greedy, decode only",
                              0.5, greedy_tokens_matched=same[best], ours_prefill_included=round(ours[best][0], 1)))

    print(json.dumps({"bench": "decode", "device": "cpu" if not torch.cuda.is_available() else "cuda",
                      "threads": args.threads, "torch": torch.__version__.split("+")[0],
                      "kv_cache_dtype": args.kv_cache_dtype, "kernel_activations": args.kernel_activations,
                      "results": results}))


if __name__ == "__main__":
    main()
