"""Multi-process jobs: the worker runs a job whose config asks for nproc > 1 under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node N -m backend.train KIND --config job.yaml
        --data-dir DIR --job-id ID [--job-resume] --json-events --stop-file PATH

Rank 0 prints the trainer's events as "@event {json}" lines on stdout; this module turns them back into the
worker's emit() calls (so the job's metrics, samples and log fill the database as for an in-process job), and
every other line into a log line. Cancel (or a worker shutting down) creates the stop file: the ranks agree to
stop after the step (backend/train/dist.py), keep a checkpoint and register. A rank that dies (killed, or an
exception) makes torchrun stop the others and exit non-zero: the job fails with that rank's error.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from backend.jobs.kinds import Outcome

ROOT = Path(__file__).resolve().parent.parent.parent
EVENT_PREFIX = "@event "      # backend/train/__main__.py prints events so
KILL_AFTER = 120.0            # seconds after a stop request before the ranks are killed


class RankFailed(RuntimeError):
    """A rank of a torchrun job failed; the message is the job's error."""


def capacity(device: str, max_procs: int | None = None) -> tuple[int, str]:
    """(how many processes this worker may launch for one job, why that many). On CPU: the cores, or
    --max-procs when given (gloo processes may share cores); on cuda: the visible GPUs, at most --max-procs."""
    import torch
    kind = device.split(":")[0]
    if kind == "cuda":
        n = torch.cuda.device_count()
        if max_procs is not None and max_procs < n:
            return max_procs, f"--max-procs {max_procs}"
        return n, f"{n} GPU(s) visible"
    if kind == "cpu":
        if max_procs is not None:
            return max_procs, f"--max-procs {max_procs}"
        n = os.cpu_count() or 1
        return n, f"{n} CPU cores (gloo processes)"
    return 1, f"{kind} runs one process"


def check_capacity(nproc: int, device: str, worker: str, max_procs: int | None = None) -> None:
    n, why = capacity(device, max_procs)
    if nproc > n:
        raise ValueError(f"nproc: the job asks for {nproc} processes, but worker {worker} on {device} runs at most "
                         f"{n} ({why}); lower nproc or run it on a worker with more devices")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the worker dies, so a killed worker leaves no training behind (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_torchrun(job: dict, nproc: int, app, device: str, emit, stop: threading.Event) -> Outcome:
    """Run the job under torchrun until it ends; its events go to emit(). Raises RankFailed on failure."""
    with tempfile.TemporaryDirectory(prefix=f"job-{job['id']}-") as tmp:
        cfg_path, stop_file = Path(tmp) / "config.yaml", Path(tmp) / "stop"
        cfg_path.write_text(json.dumps(job["config"]))  # JSON is YAML
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "backend.train", job["kind"], "--config", str(cfg_path), "--data-dir", str(app.data_dir),
               "--job-id", str(job["id"]), "--job-device", device.split(":")[0], "--json-events",
               "--stop-file", str(stop_file)]
        if job["attempt"] > 1:
            cmd.append("--job-resume")
        if job.get("snapshot_hash"):
            cmd += ["--snapshot", job["snapshot_hash"]]
        env = {**os.environ, "DATABASE_URL": app.database_url, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        emit({"log": f"launching {nproc} processes with torchrun on {device.split(':')[0]}", "step": 0})
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
        tail: collections.deque[str] = collections.deque(maxlen=80)
        last: dict = {}

        def read() -> None:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(EVENT_PREFIX):
                    try:
                        ev = json.loads(line[len(EVENT_PREFIX):])
                    except json.JSONDecodeError:
                        ev = {"log": line}
                    for key in ("done", "checkpoint", "error"):
                        if key in ev:
                            last[key] = ev
                    emit(ev)
                elif line.strip() and not line.startswith("*****"):
                    tail.append(line)
                    emit({"log": line[:1000], "step": 0})

        reader = threading.Thread(target=read, name=f"job-{job['id']}-torchrun", daemon=True)
        reader.start()
        asked = None
        while proc.poll() is None:
            if stop.is_set() and asked is None:
                stop_file.touch()  # every rank watches it; they agree to stop after the step
                asked = time.monotonic()
            if asked is not None and time.monotonic() - asked > KILL_AFTER:
                emit({"log": f"the ranks did not stop within {KILL_AFTER:.0f}s: killing them", "step": 0})
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        reader.join(10)
        if proc.returncode != 0 or "done" not in last:
            raise RankFailed(failure_message(list(tail), proc.returncode, last.get("error")))
        done = last["done"]
        return Outcome(done["done"], done["step"], last.get("checkpoint", {}).get("checkpoint"), done.get("model"),
                       {k: v for k, v in done.items() if k not in ("done", "step", "model")})


def failure_message(lines: list[str], returncode: int, error_event: dict | None) -> str:
    """The failed rank's error from torchrun's output: a rank killed by a signal first (the others then fail
    only because their peer vanished), else the first failure's exception."""
    text = "\n".join(lines)
    failures = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", text)
    # torchrun itself SIGTERMs the surviving ranks after a failure: a rank killed by another signal comes first,
    # and a SIGTERMed one only when no rank failed with an error of its own (exit status > 0)
    errored = any(int(code) > 0 for _, code, _ in failures)
    for rank, code, pid in sorted(failures, key=lambda f: int(f[1]) == -signal.SIGTERM):
        if int(code) < 0 and not (errored and int(code) == -signal.SIGTERM):
            try:
                name = signal.Signals(-int(code)).name
            except ValueError:
                name = "unknown"
            return f"rank {rank} (pid {pid}) was killed by signal {-int(code)} ({name})"
    root = text[text.rfind("Root Cause"):] if "Root Cause" in text else text  # torchrun's first failure
    rank = re.findall(r"rank\s*:\s*(\d+) \(local_rank", root)
    who = f"rank {rank[0]}" if rank else "a rank"
    # the rank's own exception: "[rank1]: ValueError: ..." lines, or the traceback in torchrun's summary
    pattern = r"^(?:\[rank\d+\]:\s*)?\s*((?:[\w.]+Error|[\w.]+Exception|error): .+)$"
    exc = [m.group(1) for m in re.finditer(pattern, root, re.M)]
    if not exc:  # a rank's "error: ..." line (python -m backend.train's exit) comes before torchrun's summary
        exc = [e for e in re.findall(pattern, text, re.M) if "ChildFailedError" not in e][:1]
    if exc:
        return f"{who} failed: {exc[-1].strip()}"
    if error_event is not None:
        return f"{who} failed: {error_event['error']}"
    return f"torchrun exited with status {returncode}: " + (lines[-1] if lines else "no output")
