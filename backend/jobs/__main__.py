"""Queue and watch training jobs from a shell (the same service as the Training tab and /api/jobs).

    python -m backend.jobs submit pretrain --config run.yaml [--snapshot HASH] [--device cuda:0] [--watch]
    python -m backend.jobs list
    python -m backend.jobs watch 3          # prints the job's events as they come, until it ends
    python -m backend.jobs cancel 3
    python -m backend.jobs resume 3 [--config more.yaml]   # overrides, e.g. a larger max_steps

A worker (`python -m backend.worker`, or the one app.py starts) runs what is queued. This CLI talks to the
database directly, like `python -m backend.users`: it is for whoever runs the server.
"""
from __future__ import annotations

import argparse
import sys
import time

from backend.config import AppConfig
from backend.db import Database
from backend.jobs import queue


def _line(job: dict) -> str:
    s = job["summary"]
    loss = f"loss {s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else ""
    return (f"{job['id']:5d}  {job['state']:10s} {job['kind']:9s} step {job['step']:6d}  {loss:12s} {job['name']}"
            + (f"  -> model {job['model']}" if job["model"] else "") + f"\n       {bar(job['progress'])}")


def bar(p: dict, width: int = 24) -> str:
    """[#######.........] 42%  step 5 of 12 · 0:42 elapsed · about 0:58 left (backend.jobs.progress)."""
    n = round(p["fraction"] * width)
    return f"[{'#' * n}{'.' * (width - n)}] {p['fraction']:4.0%}  {p['text']}"


def watch(db: Database, job_id: int, poll: float = 1.0) -> dict:
    after, shown = 0, None
    while True:
        d = queue.job_detail(db, job_id, after)
        for e in sorted(d["log"] + d["samples"], key=lambda e: e["id"]):
            if e["kind"] == "log":
                print(e["text"], flush=True)
            else:
                print(f"--- sample at step {e['step']}: {e.get('prompt', '')!r} ->\n{e['sample']}\n---", flush=True)
        after = d["last_event_id"]
        if d["state"] in queue.FINISHED:
            print(_line(d), flush=True)
            if d["summary"].get("table"):
                from backend.train.generated import format_table
                print(format_table(d["summary"]["table"]), flush=True)
            for step in d["progress"]["next"]:
                print("  next: " + step.replace("**", ""), flush=True)
            return d
        if d["progress"]["phase"] != shown:  # queued, loading, tokenizing, then each step
            shown = d["progress"]["phase"]
            print(bar(d["progress"]), flush=True)
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    from backend.train.__main__ import _load_yaml

    p = argparse.ArgumentParser(prog="python -m backend.jobs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
    p.add_argument("--database-url", default=None)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("submit", help="queue a job")
    s.add_argument("kind")
    s.add_argument("--config", help="YAML file of the kind's config fields")
    s.add_argument("--snapshot", help="content hash of the input dataset snapshot")
    s.add_argument("--device", help="only a worker on this device may run it")
    s.add_argument("--watch", action="store_true", help="then print its events until it ends")
    sub.add_parser("list", help="the newest jobs")
    for name in ("show", "watch", "cancel", "resume"):
        a = sub.add_parser(name)
        a.add_argument("id", type=int)
        if name == "resume":
            a.add_argument("--config", help="YAML file of config fields to change (e.g. max_steps)")
    args = p.parse_args(argv)

    kw = {k: v for k, v in (("data_dir", args.data_dir), ("database_url", args.database_url)) if v}
    app = AppConfig(**kw)
    app.ensure_dirs()
    db = Database(app.database_url)
    db.migrate()
    try:
        if args.action == "submit":
            job = queue.create_job(db, app, None, args.kind, _load_yaml(args.config), args.snapshot, args.device)
            print(_line(job), flush=True)
            if args.watch:
                job = watch(db, job["id"])
                sys.exit(0 if job["state"] == "succeeded" else 1)
        elif args.action == "list":
            for job in queue.list_jobs(db):
                print(_line(job))
        elif args.action == "show":
            d = queue.job_detail(db, args.id)
            print(_line(d))
            for e in d["log"][-20:]:
                print("  " + e["text"])
            if d["error"]:
                print("error: " + d["error"])
        elif args.action == "watch":
            watch(db, args.id)
        elif args.action == "cancel":
            print(_line(queue.cancel_job(db, args.id)))
        elif args.action == "resume":
            print(_line(queue.resume_job(db, app, args.id, None, _load_yaml(args.config) or None)))
    except (ValueError, LookupError) as e:
        sys.exit(f"error: {str(e).strip(chr(39))}")
    finally:
        db.close()


if __name__ == "__main__":
    main()
