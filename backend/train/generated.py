"""SFT on examples a model wrote, the part "I don't know" (idk.py) and distillation (distill.py) share:

    with serving(app) as engines:            # THE generation entry point of the app (backend/serving/model_pool.py):
        answers = ask(engines.get(name), questions, params, n)   # a local or a remote model alike
    snap = freeze(app, kind, rows, meta)     # an immutable dataset snapshot (content hash), as labels make
    out = train_on(kind, sft_cfg, ctx, snap, describe)          # the SFT trainer, lineage under `kind`
    record(app, out, ctx, kind, table, lineage)                  # before/after table: lineage, event, log

Under torchrun (nproc > 1) the whole run sits inside `with processes(cfg, ctx) as d:`. Writing the examples
happens once, on rank 0, inside d.from_main (backend/train/dist.py): the same code on the same seed as one
process, so the same rows and the same snapshot hash; every rank gets the hash and trains on that snapshot
through the SFT trainer's own data-parallel path; rank 0 alone measures, records and registers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json

from backend.jobs.kinds import JobContext, Outcome


@contextlib.contextmanager
def processes(cfg, ctx: JobContext):
    """The torch.distributed group for the whole run (a no-op in one process): made here, before the examples
    are written, so that rank 0's result can reach the others; the SFT run joins it (dist.setup)."""
    from backend.train.common import requested_device
    from backend.train.dist import setup
    d = setup(requested_device(cfg, ctx))
    try:
        yield d
    finally:
        d.close()


def stopped_early(ctx: JobContext) -> Outcome:
    """Stopped while writing the examples: no training. The event is the job's end under torchrun (the
    worker reads the outcome from rank 0's "done" event)."""
    ctx.emit({"step": 0, "done": "stopped", "model": None})
    return Outcome("stopped", 0)


@contextlib.contextmanager
def serving(app):
    """An engine pool over the registry for the length of a phase; its engines are closed after it."""
    from backend.serving.model_pool import EnginePool
    from models.registry import ModelRegistry
    pool = EnginePool(ModelRegistry(app), app, max_loaded=2)
    try:
        yield pool
    finally:
        for name in pool.loaded():
            pool.unload(name)


# Conversations per request batch: a remote engine sends one HTTP request per conversation at once, and a
# server may cap a caller's requests in flight (this app's max_requests_per_user is 8 by default).
CHUNK = 8


def ask(engine, conversations: list[list[dict]], params, n: int = 1, stop=None) -> list[list]:
    """n completions of each conversation, CHUNK conversations at a time (the scheduler decodes them together).
    `stop` (a threading.Event): once set, no further chunk is asked, and the answers so far are returned (a
    cancelled job stops within a chunk, not after the whole set: under torchrun the worker kills ranks that
    take longer)."""
    from dataclasses import replace
    if not params.stop_token_ids:
        params = replace(params, stop_token_ids=engine.default_stop_ids())
    out = []
    for i in range(0, len(conversations), CHUNK):
        if stop is not None and stop.is_set():
            break
        comps = engine.complete_batch([engine.chat_prompt(m) for m in conversations[i:i + CHUNK]], params, n=n)
        out += [comps[j * n:(j + 1) * n] for j in range(len(comps) // n)]
    return out


def freeze(app, kind: str, rows: list[dict], name: str, meta: dict, snapshot_kind: str = "sft") -> dict:
    """The rows as a dataset snapshot, SFT examples or preference pairs (the same rows: the same hash, the same
    snapshot)."""
    from backend.db import Database
    from backend.labels.snapshots import snapshot_rows
    db = Database(app.database_url)
    try:
        db.migrate()
        return snapshot_rows(db, app.data_dir, snapshot_kind, rows, name, {"made_by": kind, **meta},
                             artifacts_url=app.artifacts_url)
    finally:
        db.close()


def sft_part(cfg, sft_cls):
    """The trainer's config inside a demo's config (SFT's: the demo's config subclasses it; or DPO's, from the
    fields of the same names), reading the snapshot."""
    names = {f.name for f in dataclasses.fields(sft_cls)}
    return sft_cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names} | {"dataset": "snapshot"})


def train_on(kind: str, sft_cfg, ctx: JobContext, snapshot_hash: str, describe: str) -> Outcome:
    """SFT on the snapshot, or DPO when given a DPOConfig (its snapshot: preference pairs)."""
    from backend.train.dpo import DPOConfig, run_dpo
    from backend.train.sft import run_sft
    run = run_dpo if isinstance(sft_cfg, DPOConfig) else run_sft
    return run(sft_cfg, dataclasses.replace(ctx, snapshot_hash=snapshot_hash), kind=kind, describe=describe)


def format_table(table: list[dict]) -> str:
    """Rows of {column: value} as aligned text (the CLI prints it; the job's log shows it)."""
    cols = list(table[0])
    cell = lambda v: f"{v:.0%}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731 (rates: floats)
    width = {c: max(len(c), *(len(cell(r[c])) for r in table)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(cell(r[c]).ljust(width[c]) for c in cols) for r in table]
    return "\n".join(lines)


def record(app, out: Outcome, ctx: JobContext, kind: str, table: list[dict], lineage: dict) -> Outcome:
    """The before/after table stored with the model (lineage), the run directory (result.json) and the job
    (an info event, and the log lines the Training tab shows)."""
    from backend.jobs.pretrain import add_lineage
    extra = {**lineage, "table": table}
    if out.model:
        add_lineage(app, out.model, {kind: extra})
    run_dir = app.data_dir / "runs" / kind / out.model if out.model else None
    if run_dir is not None and run_dir.is_dir():
        (run_dir / "result.json").write_text(json.dumps(extra, indent=2, default=str))
    ctx.emit({"step": out.step, "table": table, "table_kind": kind})
    for line in format_table(table).splitlines():
        ctx.emit({"log": line, "step": out.step})
    return dataclasses.replace(out, summary={**out.summary, **extra})
