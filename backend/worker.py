"""The training worker: takes queued jobs from the database and runs them, one at a time.

    python -m backend.worker --data-dir DIR [--once] [--device cpu|cuda:0|mps] [--threads N] [--max-procs N]

Start one per device (app.py starts one unless --no-worker); several may share one database. While
a job runs, a heartbeat thread writes its events (metrics, samples, log lines) to the database twice
a second, beats the job's heart, and turns a user's cancel into the trainer's stop flag (the trainer
stops after the current step and keeps a checkpoint). A worker that dies leaves a stale heartbeat;
the next worker to poll marks that job failed, and resuming it continues from its last checkpoint.
SIGTERM/SIGINT: stop the current job at a checkpoint, hand it back to the queue, exit.
A job whose config asks for nproc > 1 runs under torchrun (backend/jobs/launch.py): N GPUs with NCCL, or N gloo
processes on CPU (at most the core count, or --max-procs); a job asking for more than this worker has fails at
once saying so.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from backend.config import AppConfig
from backend.db import Database
from backend.jobs import queue
from backend.jobs.kinds import JobContext, get_trainer, parse_config

log = logging.getLogger("backend.worker")
FLUSH_EVERY = 0.5      # seconds between database writes of buffered events (and heartbeats)
STEP_LOG_EVERY = 5.0   # seconds between "step N: loss ..." lines in the job's log


def describe_event(ev: dict) -> str | None:
    """A log line for the events worth one (metrics have their own table and curves)."""
    if "start" in ev:
        params = f"{ev['params']:,} parameters" if "params" in ev else ""
        return (f"{'resumed' if ev.get('resumed') else 'started'} run {ev['start']} at step {ev.get('step', 0)}: "
                f"{params}, {ev.get('device', '?')}, {ev.get('precision', '')}, tokenizer {ev.get('tokenizer', '?')}"
                + (f"; world size {ev['world_size']} ({ev.get('parallel')}, {ev.get('backend')})"
                   if ev.get("world_size", 1) > 1 else ""))
    if "phase" in ev:
        return str(ev["phase"])
    if "checkpoint" in ev:
        return f"step {ev['step']}: checkpoint {ev['checkpoint']}"
    if "done" in ev:
        return f"step {ev['step']}: finished ({ev['done']}); model {ev.get('model')!r}"
    if "error" in ev:
        return f"step {ev.get('step', '?')}: {ev['error']}"
    if "val_bpb" in ev:
        return f"step {ev['step']}: validation bits per byte {ev['val_bpb']:.4f}"
    return None


def step_line(ev: dict) -> str:
    parts = [f"step {ev['step']}: loss {ev['loss']:.4f}"]
    if "tokens_per_s" in ev:
        parts.append(f"{ev['tokens_per_s']:,.0f} tok/s")
    if "mfu" in ev:
        parts.append(f"MFU {100 * ev['mfu']:.2f}%")
    return ", ".join(parts)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (torchrun ranks)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Worker:
    def __init__(self, app: AppConfig, db: Database, device: str, stale_after: float = queue.STALE_AFTER,
                 poll: float = 1.0, max_procs: int | None = None):
        self.app, self.db, self.device = app, db, device
        self.max_procs = max_procs
        self.stale_after, self.poll = stale_after, poll
        self.id = queue.worker_id()
        self.shutdown = threading.Event()
        self._stop: threading.Event | None = None  # the running job's stop flag

    def request_shutdown(self, *_):
        self.shutdown.set()
        if self._stop is not None:
            self._stop.set()

    def run(self, once: bool = False) -> int:
        """Poll the queue until shut down; `once`: run at most one job. Returns the number of jobs run."""
        done = 0
        log.info("worker %s on %s polling %s", self.id, self.device, self.app.data_dir)
        while not self.shutdown.is_set():
            for job_id in queue.reap_stale(self.db, self.stale_after, me=self.id):
                log.warning("job %s: its worker died; marked failed (resumable)", job_id)
            job = queue.claim_next(self.db, self.id, self.device)
            if job is not None:
                self.run_job(job)
                done += 1
            if once:
                break
            if job is None:
                self.shutdown.wait(self.poll)
        return done

    def run_job(self, job: dict) -> str:
        job_id, attempt = job["id"], job["attempt"]
        stop = self._stop = threading.Event()
        if self.shutdown.is_set():
            stop.set()
        buffer: list[dict] = []
        lock = threading.Lock()
        last_step_log = [0.0]
        lost = threading.Event()
        finished = threading.Event()
        cancelled = threading.Event()

        def emit(ev: dict) -> None:
            now = time.time()
            out = [{**ev, "_time": now}]
            line = describe_event(ev) if "log" not in ev else None
            if line is None and "loss" in ev and now - last_step_log[0] >= STEP_LOG_EVERY:
                line, last_step_log[0] = step_line(ev), now
            if line:
                out.append({"log": line, "step": ev.get("step", 0), "_time": now})
            with lock:
                buffer.extend(out)

        def flush() -> None:
            with lock:
                batch = buffer[:]
                del buffer[:]
            try:
                if batch and not queue.append_events(self.db, job_id, self.id, attempt, batch):
                    lost.set()
            except Exception:
                with lock:  # keep them for the next try, in order
                    buffer[:0] = batch
                raise

        def beat() -> None:
            while not finished.wait(FLUSH_EVERY):
                try:
                    flush()
                    status = queue.heartbeat(self.db, job_id, self.id, attempt)
                except Exception:  # a busy or restarting database: try again next beat
                    log.exception("job %s: heartbeat failed", job_id)
                    continue
                if status == "cancel" and not cancelled.is_set():
                    cancelled.set()
                    stop.set()
                    emit({"log": "cancel received: stopping after this step", "step": 0})
                elif status == "lost":
                    lost.set()
                    stop.set()

        beater = threading.Thread(target=beat, name=f"job-{job_id}-heartbeat", daemon=True)
        beater.start()
        log.info("job %s (%s %s) attempt %s started", job_id, job["kind"], job["name"], attempt)
        state, error, outcome = "failed", None, None
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        try:
            trainer = get_trainer(job["kind"])
            cfg = parse_config(job["kind"], job["config"], self.app)
            nproc = getattr(cfg, "nproc", 1)
            if nproc > 1:
                from backend.jobs.launch import check_capacity, run_torchrun
                check_capacity(nproc, self.device, self.id, self.max_procs)
                outcome = run_torchrun(job, nproc, self.app, self.device, emit, stop)
            else:
                ctx = JobContext(self.app, emit, stop, job_id=job_id, resume=attempt > 1, device=self.device,
                                 snapshot_hash=job["snapshot_hash"], parent_model=job["parent_model"])
                outcome = trainer.run(cfg, ctx)
            if outcome.reason == "stopped" and not cancelled.is_set() and self.shutdown.is_set():
                state = "queued"  # the worker is shutting down: the next one continues from the checkpoint
                emit({"log": "worker shutting down: job handed back to the queue", "step": outcome.step})
            else:
                state = "cancelled" if outcome.reason == "stopped" else "succeeded"
        except Exception as e:
            from backend.jobs.launch import RankFailed
            error = str(e) if isinstance(e, RankFailed) else f"{type(e).__name__}: {e}"
            for line in ([] if isinstance(e, RankFailed) else traceback.format_exc().rstrip().splitlines()[-12:]):
                emit({"log": line, "step": 0})
            log.warning("job %s failed: %s", job_id, error)
        finally:
            # what the job cost, in the log: CPU-seconds are comparable across machines with other work running
            emit({"log": f"{cpu_seconds() - cpu0:.0f} CPU-seconds over {time.monotonic() - wall0:.0f} s wall",
                  "step": outcome.step if outcome else 0})
            finished.set()
            beater.join()
            self._stop = None
        try:
            flush()
        except Exception:
            log.exception("job %s: could not store its last events", job_id)
        if lost.is_set():
            log.warning("job %s is no longer this worker's (declared dead meanwhile?): not recording its end", job_id)
            return "lost"
        queue.finish_job(self.db, job_id, self.id, attempt, state, error=error,
                         model=outcome.model if outcome else None,
                         checkpoint=outcome.checkpoint if outcome else None,
                         step=outcome.step if outcome else None)
        log.info("job %s %s", job_id, state)
        if outcome is not None and outcome.model and state in ("succeeded", "cancelled"):
            self.queue_report_card(outcome.model, job_id)
        return state

    def queue_report_card(self, model: str, job_id: int) -> None:
        """A job registered `model`: queue its report card (backend/evals/job.py), unless turned off."""
        from backend.evals.job import queue_report_card
        queue_report_card(self.db, self.app, model, f"registered by job {job_id}")


def spawn_worker(app: AppConfig) -> subprocess.Popen:
    """Start `python -m backend.worker` for this app's data directory and database (app.py does this).

    The database URL goes through the environment (it may hold a password; argv is world-readable).
    The worker exits by itself when this process goes away (--exit-with-parent).
    """
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DATABASE_URL": app.database_url, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    # how OpenMP threads wait (GOMP_SPINCOUNT, backend/runtime.py) comes with os.environ: app.py set it
    if app.artifacts_url:  # the worker publishes where this server lists (models/artifacts.py)
        env["PLAYGROUND_ARTIFACTS"] = app.artifacts_url
    cmd = [sys.executable, "-m", "backend.worker", "--data-dir", str(app.data_dir), "--device", app.device,
           "--threads", str(app.threads), "--eval-on-register", str(app.eval_on_register),
           "--exit-with-parent", str(os.getpid())]
    return subprocess.Popen(cmd, cwd=root, env=env)


def stop_worker(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM: the running job stops at a checkpoint and goes back to the queue; SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("worker %s did not stop within %ss: killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()


def _watch_parent(parent: int, worker: Worker) -> None:
    """Shut down when the process that started us is gone (killed servers must not leave workers behind)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    log.warning("parent process %s is gone: shutting down", parent)
    worker.request_shutdown()
    time.sleep(60.0)
    os._exit(1)  # the job did not stop in time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL (default $DATABASE_URL or SQLite in the data dir)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps: this worker runs jobs on it")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--once", action="store_true", help="run at most one queued job, then exit")
    p.add_argument("--eval-on-register", type=int, default=None, metavar="N",
                   help="queue a report card (N questions per row) of every model a job registers; 0: none "
                        "(default $PLAYGROUND_EVAL_ON_REGISTER or 8)")
    p.add_argument("--max-procs", type=int, default=None,
                   help="most processes one job may launch (default: the GPUs, or on CPU the cores)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue")
    p.add_argument("--stale-after", type=float, default=queue.STALE_AFTER,
                   help="seconds without a heartbeat after which a running job's worker is taken for dead")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    kw = {"device": args.device}
    if args.eval_on_register is not None:
        kw["eval_on_register"] = args.eval_on_register
    if args.data_dir:
        kw["data_dir"] = args.data_dir
    if args.database_url:
        kw["database_url"] = args.database_url
    app = AppConfig(**kw, threads=args.threads)
    app.ensure_dirs()
    import torch

    from models.device import pick_device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = str(pick_device(args.device))
    db = Database(app.database_url)
    db.migrate()
    worker = Worker(app, db, device, stale_after=args.stale_after, poll=args.poll, max_procs=args.max_procs)
    signal.signal(signal.SIGTERM, worker.request_shutdown)
    signal.signal(signal.SIGINT, worker.request_shutdown)
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(args.exit_with_parent, worker), daemon=True).start()
    try:
        worker.run(once=args.once)
    finally:
        db.close()


if __name__ == "__main__":
    main()
