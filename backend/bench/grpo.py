"""python -m backend.bench grpo [--preset cpu-30min] [--threads 1] [--model smollm2-135m-instruct]

The issue's goal "GRPO preset: held-out accuracy up by >= 10 points within 30 CPU-minutes, curves saved",
measured by running the trainer the worker runs (backend.train.grpo.run_grpo) in this process:

- budget: CPU seconds of this process (resource.getrusage user+sys, all threads), load-independent; the
  preset stops itself before a step plus the final evaluation would pass max_cpu_seconds (1800). Wall
  seconds are reported too (they depend on what else the machine runs).
- accuracy: a fixed held-out set of n_heldout problems generated with another seed than the training
  problems (backend/datasets/verifiable.py; seed + 99991), greedy decoding of at most eval_tokens tokens,
  before training (the parent model) and after. Two extraction rules, both reported:
    strict  the reply states its answer ("the answer is N", <answer>, or after </think>): the reward rule;
    lenient the stated answer if any, else the last number of the reply: so a gain is not only formatting.
- curves (held-out accuracy, mean response length, reward, KL, CPU seconds per step): the run's
  curves.json and metrics.jsonl in data_dir/runs/grpo/NAME/, copied with the summary to
  data_dir/bench/grpo.json; as a job the same events are the job's metrics (the Training tab's curves).

There is no peer here: TRL's GRPOTrainer is not installed (and would double a 30-minute run); the
"peer" of the accuracy rows is the parent model before GRPO, on the same held-out set and decoding.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from backend.config import AppConfig


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m backend.bench grpo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-30min")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1, help="1 spends the fewest CPU-seconds per step")
    ap.add_argument("--max-steps", type=int, help="override the preset (e.g. a smoke run)")
    ap.add_argument("--data-dir")
    args = ap.parse_args(argv)
    from backend.jobs.kinds import JobContext, parse_config
    from backend.train.grpo import PRESETS, run_grpo
    app = AppConfig(data_dir=args.data_dir) if args.data_dir else AppConfig()
    torch.set_num_threads(args.threads)
    fields = {"parent_model": args.model, "preset": "default", **PRESETS[args.preset], "threads": args.threads,
              "name": f"bench-grpo-{args.preset}", "register": False}
    if args.max_steps:
        fields["max_steps"] = args.max_steps
    cfg = parse_config("grpo", fields, app)
    events: list[dict] = []

    def emit(ev: dict) -> None:
        events.append(ev)
        if "sample" in ev:
            print(f"--- step {ev['step']} greedy answer: {ev['sample']!r}", flush=True)
        elif ("held_out_accuracy" in ev or "loss" in ev) and "done" not in ev:
            keys = ("step", "reward", "train_accuracy", "kl", "response_length", "held_out_accuracy",
                    "held_out_accuracy_lenient", "held_out_length", "cpu_s")
            print(json.dumps({k: ev[k] for k in keys if k in ev}), flush=True)

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    out = run_grpo(cfg, JobContext(app, emit=emit))
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    evals = [e for e in events if "held_out_accuracy" in e and "done" not in e]
    before, after = evals[0], evals[-1]
    run_dir = app.data_dir / "runs" / "grpo" / cfg.name
    curves = json.loads((run_dir / "curves.json").read_text())
    pct = lambda x: round(100 * x, 1)  # noqa: E731
    results = []
    for rule, key in (("strict", "held_out_accuracy"), ("lenient", "held_out_accuracy_lenient")):
        results.append({"metric": f"held-out accuracy ({rule}), {cfg.n_heldout} problems", "unit": "%",
                        "ours": pct(after[key]), "peer": pct(before[key]),
                        "peer_name": "the parent model before GRPO (same problems, greedy)",
                        "gain_points": round(pct(after[key]) - pct(before[key]), 1), "goal_points": 10.0,
                        "ratio": round(after[key] / before[key], 2) if before[key] else None})
    summary = {"bench": "grpo", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
               "model": args.model, "preset": args.preset, "steps": out.step, "stopped_by": out.reason,
               "cpu_s": round(cpu, 1), "cpu_s_budget": cfg.max_cpu_seconds, "wall_s": round(wall, 1),
               "eval_cpu_s": round(sum(e.get("eval_cpu_s", 0) for e in evals), 1),
               "mean_response_length": {"before": before["held_out_length"], "after": after["held_out_length"]},
               "curves": str(run_dir / "curves.json"), "results": results}
    (app.data_dir / "bench").mkdir(parents=True, exist_ok=True)
    (app.data_dir / "bench" / "grpo.json").write_text(json.dumps({**summary, "config": fields, "per_step": curves}))
    print(json.dumps(summary))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
