"""idk variants on one probe: probe the parent once per seed (cached), then for each variant write its examples,
train and measure the held-out table, as `python -m backend.train idk` does (the same functions:
probe_parent, examples, train_on, measure). Each variant then costs its SFT and measurement (~5 minutes for
SmolLM2-135M on 2 cores) instead of the whole run (~8).

    PYTHONPATH=. .venv/bin/python scripts/idk_sweep.py --data-dir /work/idk/data --seed 0 defaults sure_quantile=0.1 \
        anchor=0,sure_quantile=0,known_reply=best,answer_sure=false

A variant is comma-separated FIELD=VALUE of IDKConfig, read as the CLI reads `--set KEY=VALUE` (_overrides:
YAML values, answer_sure=false) and checked as a job's config is; "defaults" for none. Prints one RESULT line
(the "after" row as JSON) per variant.
"""
import argparse
import json
import pickle
import threading
import time
from pathlib import Path

from backend.config import AppConfig
from backend.jobs.kinds import JobContext, parse_config
from backend.train import idk
from backend.train.__main__ import _overrides
from backend.train.generated import freeze, serving, sft_part, train_on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    app = AppConfig(data_dir=a.data_dir)
    base = {"parent_model": a.model, "seed": a.seed}
    cfg = parse_config("idk", base, app)
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
        name = (f"idk-sweep-s{a.seed}-" + "".join(ch if ch.isalnum() else "-" for ch in variant.lower()))[:64]
        # the CLI's own --set parsing and the job door's checks: a typo or a wrong type names the field
        c = parse_config("idk", {**base, **(_overrides(variant.split(",")) if variant != "defaults" else {}),
                                 "name": name}, app)
        t = time.time()
        write, kind, _, trainer_cfg = idk.WRITES[c.method]
        snap = freeze(app, "idk", write(probed, c), f"idk-sweep-{a.model}", {"variant": variant, "seed": a.seed}, kind)
        out = train_on("idk", sft_part(c, trainer_cfg), ctx, snap["hash"], f"idk sweep: {variant}")
        with serving(app) as engines:
            after = idk.measure(engines.get(out.model), held, c, out.model, "after")
        print("RESULT", a.seed, variant, json.dumps(after), f"{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
