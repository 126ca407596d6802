"""idk variants on one probe: probe the parent once per seed (cached), then for each variant write its examples,
train and measure the held-out table, as `python -m backend.train idk` does (the same functions:
probe_parent, examples, train_on, measure). Each variant then costs its SFT and measurement (~5 minutes for
SmolLM2-135M on 2 cores) instead of the whole run (~11).

    PYTHONPATH=. .venv/bin/python scripts/idk_sweep.py --data-dir /work/idk/data --seed 0 anchor=1 anchor=1,balance=4

A variant is comma-separated FIELD=VALUE of IDKConfig (the CLI's flags: --balance 4 is balance=4); "defaults"
for none. Prints one RESULT line (the "after" row as JSON) per variant.
"""
import argparse
import dataclasses
import json
import pickle
import threading
import time
from pathlib import Path

from backend.config import AppConfig
from backend.jobs.kinds import JobContext, parse_config
from backend.train import idk
from backend.train.generated import freeze, serving, sft_part, train_on


def fields(cfg, variant: str) -> dict:
    if variant == "defaults":
        return {}
    out = {}
    for part in variant.split(","):
        k, _, v = part.partition("=")
        kind = type(getattr(cfg, k))
        out[k] = v.lower() in ("1", "true", "yes") if kind is bool else kind(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    app = AppConfig(data_dir=a.data_dir)
    cfg = parse_config("idk", {"parent_model": a.model, "seed": a.seed}, app)
    ctx = JobContext(app, emit=lambda ev: None, stop=threading.Event())
    # a scratch file of this script's own; v2: the greedy answers and their sureness (idk.say_greedily) in it
    cache = Path(a.data_dir) / f"idk-probe-{a.model}-seed{a.seed}-v2.pkl"
    if cache.exists():
        probed, held, before = pickle.loads(cache.read_bytes())
    else:
        probed, held, before = idk.probe_parent(cfg, ctx)
        cache.write_bytes(pickle.dumps((probed, held, before)))
    print("BEFORE", json.dumps(before), flush=True)
    for variant in a.variants:
        c = dataclasses.replace(cfg, **fields(cfg, variant))
        c.name = (f"idk-sweep-s{a.seed}-" + "".join(ch if ch.isalnum() else "-" for ch in variant.lower()))[:64]
        c.validate()
        t = time.time()
        write, kind, _, trainer_cfg = idk.WRITES[c.method]
        snap = freeze(app, "idk", write(probed, c), f"idk-sweep-{a.model}", {"variant": variant, "seed": a.seed}, kind)
        out = train_on("idk", sft_part(c, trainer_cfg), ctx, snap["hash"], f"idk sweep: {variant}")
        with serving(app) as engines:
            after = idk.measure(engines.get(out.model), held, c, out.model, "after")
        print("RESULT", a.seed, variant, json.dumps(after), f"{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
