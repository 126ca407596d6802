"""The job queue in the database: what the REST API, the Training tab, the CLI and the worker call.

    job = create_job(db, app, user, "pretrain", {"preset": "tiny", "max_seconds": 60})
    get_job(db, job["id"]); job_detail(db, job["id"], after=last_event_id)   # live view: new events only
    cancel_job(db, job["id"], user); resume_job(db, app, job["id"], user)

States: queued -> running -> succeeded | failed | cancelled. A worker takes a job with `claim_next`,
a compare-and-set (UPDATE ... WHERE id = ? AND state = 'queued') that one worker wins on SQLite and
PostgreSQL alike; afterwards every write of the worker names (worker, attempt), so a worker that
lost its job (declared dead by `reap_stale`, say) can no longer touch it.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timezone

from sqlalchemy import delete, func, select, update

from backend.config import AppConfig
from backend.db import Database
from backend.db.models import Job, JobEvent, User, utcnow
from backend.jobs.kinds import config_dict, get_trainer, parse_config
from backend.jobs.progress import STARTING, job_progress
from backend.users import CurrentUser

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# A running job whose worker has not beaten its heart for this long is taken for dead.
STALE_AFTER = 30.0
LOG_TAIL = 200


def _payload(j: Job, creator: str | None = None, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    return {
        "id": j.id, "kind": j.kind, "name": j.name, "state": j.state, "config": j.config,
        "snapshot_hash": j.snapshot_hash, "parent_model": j.parent_model, "device": j.device,
        "created_by": creator, "created_at": j.created_at.isoformat() if j.created_at else None,
        "started_at": j.started_at.isoformat() if j.started_at else None,
        "finished_at": j.finished_at.isoformat() if j.finished_at else None,
        "worker": j.worker, "attempt": j.attempt, "cancel_requested": j.cancel_requested,
        "heartbeat_age": round(now - j.heartbeat, 1) if j.heartbeat and j.state == "running" else None,
        "step": j.step, "checkpoint": j.checkpoint, "model": j.model, "summary": j.summary or {},
        "error": j.error, "resumable": j.state in FINISHED,
        "progress": job_progress(j.kind, j.state, j.config or {}, j.step, j.summary or {}, _epoch(j.started_at),
                                 _epoch(j.finished_at), now, j.model),
    }


def _epoch(t) -> float | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()  # SQLite hands datetimes back naive


def _event(e: JobEvent) -> dict:
    return {"id": e.id, "kind": e.kind, "step": e.step, "time": e.created_at, **e.data}


# -- what users do ---------------------------------------------------------------------------------
def create_job(db: Database, app: AppConfig, user: CurrentUser | None, kind: str, config: dict | None = None,
               snapshot: str | None = None, device: str | None = None) -> dict:
    """Validate the config (ValueError naming the key) and queue the job."""
    trainer = get_trainer(kind)
    cfg = parse_config(kind, config or {}, app)
    if snapshot is not None:
        from backend.labels.snapshots import get_snapshot
        try:
            snapshot = get_snapshot(db, snapshot)["hash"]
        except LookupError:
            raise ValueError(f"snapshot: no dataset snapshot with hash {snapshot!r}") from None
    if device is not None and (not isinstance(device, str) or not device.strip()):
        raise ValueError("device: give a device name such as 'cpu' or 'cuda:0', or leave it out")
    with db.session() as s:
        job = Job(kind=kind, state="queued", config={}, snapshot_hash=snapshot, device=device,
                  parent_model=getattr(cfg, "parent_model", None), created_by=user.id if user else None,
                  summary={})
        s.add(job)
        s.flush()
        if getattr(cfg, "name", "") is None and trainer.default_name is not None:
            cfg.name = trainer.default_name(cfg, job.id)
        job.name = getattr(cfg, "name", None) or f"{kind}-j{job.id}"
        job.config = config_dict(cfg)
        s.add(JobEvent(job_id=job.id, kind="log", step=0, created_at=time.time(),
                       data={"text": f"queued by {user.name if user else 'the CLI'}"}))
        s.flush()
        return _payload(job, user.name if user else None)


def list_jobs(db: Database, limit: int = 100) -> list[dict]:
    now = time.time()
    with db.read() as s:
        rows = s.execute(select(Job, User.name).outerjoin(User, Job.created_by == User.id)
                         .order_by(Job.id.desc()).limit(limit)).all()
        return [_payload(j, name, now) for j, name in rows]


def get_job(db: Database, job_id: int) -> dict:
    with db.read() as s:
        row = s.execute(select(Job, User.name).outerjoin(User, Job.created_by == User.id)
                        .where(Job.id == job_id)).first()
        if row is None:
            raise LookupError(f"no job {job_id}")
        return _payload(*row)


def job_events(db: Database, job_id: int, after: int = 0, kinds: tuple[str, ...] | None = None,
               limit: int | None = None) -> list[dict]:
    """Events with id > after, oldest first (`limit`: only the newest that many)."""
    with db.read() as s:
        q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
        if kinds:
            q = q.where(JobEvent.kind.in_(kinds))
        if limit:
            rows = list(s.scalars(q.order_by(JobEvent.id.desc()).limit(limit)))[::-1]
        else:
            rows = list(s.scalars(q.order_by(JobEvent.id)))
        return [_event(e) for e in rows]


def job_detail(db: Database, job_id: int, after: int = 0) -> dict:
    """The job with its metrics (one per step), samples, checkpoints and the log tail, all with id > after.

    A poller passes the largest event id it has seen as `after` and appends; `reset` true means the
    history was rewritten (a resume dropped events past its checkpoint) and the poller starts over.
    An RLHF job also carries "reward_hacking": the whole run's turning point and samples (None before a step).
    """
    job = get_job(db, job_id)
    with db.read() as s:
        newest = s.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id)) or 0
    reset = 0 < after and (after > newest or after < job["summary"].get("history_from", 0))
    if reset:
        after = 0
    events = job_events(db, job_id, after, kinds=("metric", "sample", "checkpoint", "info"))
    job["metrics"] = [e for e in events if e["kind"] == "metric"]
    job["samples"] = [e for e in events if e["kind"] == "sample"]
    job["checkpoints"] = [e for e in events if e["kind"] == "checkpoint"]
    job["info"] = [e for e in events if e["kind"] == "info"]
    job["log"] = job_events(db, job_id, after, kinds=("log",), limit=LOG_TAIL)
    job["last_event_id"] = max([after, *(e["id"] for e in events), *(e["id"] for e in job["log"])])
    job["reset"] = reset
    if job["kind"] == "rlhf":
        job["reward_hacking"] = _reward_hacking(db, job_id)
    return job


def _reward_hacking(db: Database, job_id: int) -> dict | None:
    """An RLHF job's turning point and its before/after samples (backend/train/hacking.py), from all its events."""
    from backend.train.hacking import reward_hacking_view
    events = job_events(db, job_id, 0, kinds=("metric", "sample"))
    return reward_hacking_view([e for e in events if e["kind"] == "metric"], [e for e in events if e["kind"] == "sample"])


def cancel_job(db: Database, job_id: int, user: CurrentUser | None = None, stale_after: float = STALE_AFTER) -> dict:
    """Queued: cancelled at once. Running: the worker stops after the current step and keeps a checkpoint
    (state cancelled when it has). Running with a dead worker: cancelled at once."""
    who = user.name if user else "the CLI"
    now = time.time()
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.state in FINISHED:
            raise ValueError(f"job {job_id} is already {job.state}")
        if job.state == "queued" or (job.heartbeat or 0) < now - stale_after:
            job.state, job.finished_at, job.cancel_requested = "cancelled", utcnow(), False
            text = f"cancelled by {who}"
        else:
            job.cancel_requested = True
            text = f"cancel requested by {who}: stopping after the current step"
        s.add(JobEvent(job_id=job_id, kind="log", step=job.step, created_at=now, data={"text": text}))
    return get_job(db, job_id)


def resume_job(db: Database, app: AppConfig, job_id: int, user: CurrentUser | None = None,
               overrides: dict | None = None) -> dict:
    """Queue a finished job again; its trainer continues from the run's latest checkpoint.

    `overrides` changes config fields for the rest of the run (say a larger max_steps)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.state not in FINISHED:
            raise ValueError(f"job {job_id} is {job.state}: only a finished job (failed, cancelled, succeeded) can be resumed")
        config = dict(job.config)
        if overrides:
            if "name" in overrides and overrides["name"] != job.name:
                raise ValueError("name: a resumed job keeps its run name")
            config.update(overrides)
        cfg = parse_config(job.kind, config, app)
        n = s.execute(update(Job).where(Job.id == job_id, Job.state == job.state).values(
            state="queued", config=config_dict(cfg), cancel_requested=False, error=None, finished_at=None,
            worker=None, heartbeat=None)).rowcount
        if n != 1:
            raise ValueError(f"job {job_id} changed state meanwhile; try again")
        s.add(JobEvent(job_id=job_id, kind="log", step=job.step, created_at=time.time(),
                       data={"text": f"resume requested by {user.name if user else 'the CLI'}"
                                     + (f" with {overrides}" if overrides else "")}))
    return get_job(db, job_id)


# -- what workers do -----------------------------------------------------------------------------
def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_next(db: Database, worker: str, device: str | None = None, only: int | None = None) -> dict | None:
    """Take the oldest queued job this worker may run (its device, or none asked for); None if none.
    Training jobs go before report cards. `only`: that job alone (a family job runs its members itself).

    Compare-and-set: of several workers racing for the same row, exactly one UPDATE matches it.
    """
    for _ in range(20):
        with db.read() as s:
            q = select(Job.id).where(Job.state == "queued")
            q = q if only is None else q.where(Job.id == only)
            q = q.where((Job.device.is_(None)) | (Job.device == device)) if device else q.where(Job.device.is_(None))
            # report cards (kind "eval", queued when a job registers a model) wait for the training jobs people asked for
            job_id = s.scalar(q.order_by(Job.kind == "eval", Job.id).limit(1))
        if job_id is None:
            return None
        now = time.time()
        with db.session() as s:
            won = s.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(
                state="running", worker=worker, attempt=Job.attempt + 1, heartbeat=now,
                started_at=utcnow(), cancel_requested=False, error=None)).rowcount == 1
            if won:
                job = s.get(Job, job_id)
                # This attempt's progress starts over: the trainer reports its phases, then "training".
                job.summary = {k: v for k, v in (job.summary or {}).items()
                               if k not in ("train_t0", "train_from_step", "last_metric_at")} | {"phase": STARTING}
                s.add(JobEvent(job_id=job_id, kind="log", step=job.step, created_at=now,
                               data={"text": f"attempt {job.attempt} started by worker {worker}"
                                             + (f" on {device}" if device else "")}))
        if won:
            return get_job(db, job_id)
    return None


def _owned(job_id: int, worker: str, attempt: int):
    return (Job.id == job_id, Job.worker == worker, Job.attempt == attempt, Job.state == "running")


def heartbeat(db: Database, job_id: int, worker: str, attempt: int) -> str:
    """'ok', 'cancel' (a user asked to stop) or 'lost' (the job is no longer this worker's)."""
    with db.session() as s:
        n = s.execute(update(Job).where(*_owned(job_id, worker, attempt)).values(heartbeat=time.time())).rowcount
        if n != 1:
            return "lost"
        return "cancel" if s.scalar(select(Job.cancel_requested).where(Job.id == job_id)) else "ok"


def classify(event: dict) -> str:
    """Which kind of job event a trainer event is."""
    if "log" in event:
        return "log"
    if "sample" in event:
        return "sample"
    if "checkpoint" in event:
        return "checkpoint"
    if any(k in event for k in ("start", "done", "error")):
        return "info"
    if any(_number(v) for k, v in event.items() if k not in ("step", "_time")):
        return "metric"  # any number but the step: loss, val_bpb, accuracy, reward, kl...
    return "info"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def append_events(db: Database, job_id: int, worker: str, attempt: int, events: list[dict]) -> bool:
    """Store a batch of trainer events in one transaction and fold them into the job row; False if not ours."""
    if not events:
        return True
    now = time.time()
    with db.session() as s:
        job = s.scalar(select(Job).where(*_owned(job_id, worker, attempt)))
        if job is None:
            return False
        summary = dict(job.summary or {})
        for ev in events:
            kind = classify(ev)
            step = int(ev.get("step", job.step) or 0)
            if kind == "info" and "start" in ev and ev.get("resumed"):
                # The trainer went back to its checkpoint at `step`: drop what was logged after it,
                # so the curve continues from there instead of forking.
                s.flush()
                s.execute(delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.step > step,
                                                 JobEvent.kind.in_(("metric", "sample", "checkpoint"))))
                summary["history_from"] = (s.scalar(select(func.max(JobEvent.id))) or 0) + 1
            at = ev.get("_time", now)  # when the worker received it
            data = {"text": ev["log"]} if kind == "log" else {k: v for k, v in ev.items() if k != "_time"}
            s.add(JobEvent(job_id=job_id, kind=kind, step=step, created_at=at, data=data))
            if kind == "info" and "phase" in ev:
                summary["phase"] = str(ev["phase"])  # what the trainer does before its first step
            if kind == "metric":
                summary["last_metric_at"] = at
                job.step = max(step, job.step)
                summary.update({k: v for k, v in ev.items() if _number(v) and k != "_time"})
                summary["step"] = job.step
            elif kind == "checkpoint":
                job.checkpoint = ev["checkpoint"]
            elif kind == "info" and "start" in ev:
                job.step = step
                summary.update({"phase": "training", "train_t0": at, "train_from_step": step})
                summary.update({k: ev[k] for k in ("params", "device", "precision", "tokenizer", "peak_flops_source")
                                if k in ev})
            elif kind == "info" and "done" in ev:
                job.model = ev.get("model") or job.model
            elif kind == "info" and isinstance(ev.get("table"), list):
                summary["table"] = ev["table"]  # a demo's before/after table (backend/train/generated.py)
        job.summary = summary
    return True


def finish_job(db: Database, job_id: int, worker: str, attempt: int, state: str, error: str | None = None,
               model: str | None = None, checkpoint: str | None = None, step: int | None = None) -> bool:
    """Final state of a job this worker owns; 'queued' hands it back (the worker is shutting down)."""
    assert state in STATES and state != "running"
    values: dict = {"state": state, "error": error, "cancel_requested": False, "heartbeat": None}
    if state != "queued":
        values["finished_at"] = utcnow()
    if model:
        values["model"] = model
    if checkpoint:
        values["checkpoint"] = checkpoint
    if step is not None:
        values["step"] = step
    with db.session() as s:
        return s.execute(update(Job).where(*_owned(job_id, worker, attempt)).values(**values)).rowcount == 1


def reap_stale(db: Database, stale_after: float = STALE_AFTER, me: str | None = None) -> list[int]:
    """Mark failed (resumable) every running job whose worker died: no heartbeat for `stale_after`
    seconds, or a worker process on this host that no longer exists, or one that had the id of the
    caller `me` (a restarted worker given the dead one's pid, as in a restarted container). Returns their ids."""
    now = time.time()
    host = socket.gethostname()
    with db.read() as s:
        running = s.execute(select(Job.id, Job.worker, Job.attempt, Job.heartbeat).where(Job.state == "running")).all()
    reaped = []
    for job_id, worker, attempt, beat in running:
        dead_pid = worker is not None and worker == me
        if not dead_pid and worker and worker.rsplit(":", 1)[0] == host:
            try:
                os.kill(int(worker.rsplit(":", 1)[1]), 0)
            except ProcessLookupError:
                dead_pid = True
            except (ValueError, PermissionError):
                pass
        if not dead_pid and (beat or 0) >= now - stale_after:
            continue
        why = "its process is gone" if dead_pid else f"no heartbeat for {now - (beat or 0):.0f}s"
        with db.session() as s:
            n = s.execute(update(Job).where(*_owned(job_id, worker, attempt)).values(
                state="failed", finished_at=utcnow(), heartbeat=None, cancel_requested=False,
                error=f"worker {worker} died ({why}); resume to continue from the last checkpoint")).rowcount
            if n:
                s.add(JobEvent(job_id=job_id, kind="log", step=0, created_at=now,
                               data={"text": f"worker {worker} died ({why}): marked failed, resumable"}))
                reaped.append(job_id)
    return reaped
