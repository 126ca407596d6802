"""python -m backend.bench labels [--annotators 50] [--rounds 20] [--think-ms 0]

N annotators rank over HTTP at the same time, each as its own client: get the next item, post its
order, pause (--think-ms), repeat. The same client code drives two servers, one after the other:
- ours: the real server (`python app.py`, SQLite file, API-key auth, queue, validation, upsert);
- peer: the least a FastAPI server can do for the same two calls over plain sqlite3 (no auth, no
  validation; next = first item this caller has not ranked, submit = one upsert under a write lock;
  the same WAL + synchronous=NORMAL durability), loaded with the same prompts and candidates.
Reports rankings/s, p50/p99 latency of the submitting POST, server CPU per ranking (process CPU
seconds / rankings: next + submit, and whatever the server burns meanwhile; it does not depend on
how busy the machine is), and rows lost (acknowledged but not in the database with the acknowledged
order afterwards; must be 0). Goal (issue 5): 50 annotators, p99 <= 250 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import Request  # at module level: the peer's handlers name it in (string) annotations

ROOT = Path(__file__).resolve().parents[2]
PEER_NAME = "minimal FastAPI + sqlite3: same two calls, no auth or validation"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): a load-independent cost per request."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


# ---- peer: the least a server can do to hand out items and store rankings --------------------------

def peer_db(path: Path, prompts: list[str], candidates: list[list[str]]) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript("""
        CREATE TABLE items (id INTEGER PRIMARY KEY, prompt TEXT);
        CREATE TABLE candidates (id INTEGER PRIMARY KEY, item INTEGER, position INTEGER, text TEXT);
        CREATE TABLE rankings (id INTEGER PRIMARY KEY, user TEXT, item INTEGER, ord TEXT, UNIQUE (item, user));
        CREATE INDEX candidates_item ON candidates (item);
    """)
    for i, (p, cands) in enumerate(zip(prompts, candidates), 1):
        con.execute("INSERT INTO items VALUES (?, ?)", (i, p))
        con.executemany("INSERT INTO candidates (item, position, text) VALUES (?, ?, ?)",
                        [(i, j, c) for j, c in enumerate(cands)])
    con.commit()
    con.close()


def serve_peer(port: int, db_path: str) -> None:
    import threading

    import uvicorn
    from fastapi import FastAPI

    local, write_lock = threading.local(), threading.Lock()
    app = FastAPI()

    def con() -> sqlite3.Connection:
        if not hasattr(local, "con"):
            local.con = sqlite3.connect(db_path, timeout=30, isolation_level=None)
            local.con.execute("PRAGMA synchronous=NORMAL")
        return local.con

    def caller(request: Request) -> str:
        return request.headers.get("authorization", "")[7:]  # the "key" is the name; no lookup

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/api/rankings/next")
    def next_item(request: Request, set_id: int | None = None):
        c = con()
        row = c.execute("SELECT id, prompt FROM items WHERE NOT EXISTS (SELECT 1 FROM rankings r WHERE r.item = items.id "
                        "AND r.user = ?) ORDER BY id LIMIT 1", (caller(request),)).fetchone()
        if row is None:
            return {"done": True}
        cands = c.execute("SELECT id, position, text FROM candidates WHERE item = ? ORDER BY position", (row[0],)).fetchall()
        return {"item_id": row[0], "prompt": row[1], "candidates": [{"id": i, "position": p, "text": t} for i, p, t in cands]}

    @app.post("/api/rankings/items/{item_id}")
    def submit(item_id: int, body: dict, request: Request):
        with write_lock:  # one writer at a time, as any SQLite server must (ours queues the same way)
            con().execute("INSERT INTO rankings (user, item, ord) VALUES (?, ?, ?) "
                          "ON CONFLICT (item, user) DO UPDATE SET ord = excluded.ord",
                          (caller(request), item_id, json.dumps(body["order"])))
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- load: one client for both servers -------------------------------------------------------------

async def annotate(base: str, keys: list[str], set_id: int, rounds: int, think: float = 0.0,
                   stop: asyncio.Event | None = None):
    """Every key is one annotator: next item, submit its candidates in reverse, pause; `rounds` times, or
    until `stop` is set or the server stops answering (bench hardening kills it).
    Returns (submit latencies, acknowledged (key, item_id, order), wall seconds)."""
    latencies, acked = [], []

    async def annotator(key: str):
        async with httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in range(rounds):
                if stop is not None and stop.is_set():
                    return
                try:
                    item = (await c.get("/api/rankings/next", params={"set_id": set_id})).json()
                    if item.get("done"):
                        return
                    order = [x["id"] for x in item["candidates"]][::-1]
                    t = time.perf_counter()
                    r = await c.post(f"/api/rankings/items/{item['item_id']}", json={"order": order})
                except httpx.TransportError:  # the server is gone: what it acknowledged is in `acked`
                    return
                latencies.append(time.perf_counter() - t)
                if r.status_code == 200:
                    acked.append((key, item["item_id"], order))
                await asyncio.sleep(think)

    t0 = time.perf_counter()
    await asyncio.gather(*(annotator(k) for k in keys))
    return latencies, acked, time.perf_counter() - t0


def measure(name: str, proc: subprocess.Popen, base: str, keys: list[str], set_id: int, rounds: int, think: float) -> dict:
    cpu0 = cpu_seconds(proc.pid)
    lat, acked, wall = asyncio.run(annotate(base, keys, set_id, rounds, think))
    cpu = (cpu_seconds(proc.pid) - cpu0) / max(1, len(acked)) * 1e3
    out = {"lat": lat, "acked": acked, "rate": len(acked) / wall, "p50": percentile(lat, 50) * 1e3,
           "p99": percentile(lat, 99) * 1e3, "cpu_ms": cpu}
    print(f"{name}: {len(acked)} rankings in {wall:.2f}s = {out['rate']:.1f}/s; p50 {out['p50']:.1f} ms, "
          f"p99 {out['p99']:.1f} ms; server CPU {cpu:.2f} ms per ranking (next + submit)", flush=True)
    return out


def lost(acked: list[tuple], stored: dict) -> int:
    return sum(stored.get((key, item)) != order for key, item, order in acked)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend.bench labels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--rounds", type=int, default=20, help="rankings each annotator submits")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="pause after each submission (0: every annotator submits back to back, a stress test)")
    p.add_argument("--serve-peer", nargs=2, metavar=("PORT", "DB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_peer:
        return serve_peer(int(args.serve_peer[0]), args.serve_peer[1])

    from argon2 import PasswordHasher
    from sqlalchemy import select

    from backend import users
    from backend.db import Database
    from backend.db.models import Ranking, User
    from backend.labels import rankings as rk

    n, rounds, warm = args.annotators, args.rounds, 2  # warm: annotators x 3 rounds on each server first
    tmp = Path(tempfile.mkdtemp(prefix="bench-labels-"))
    data = tmp / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    # The bench signs in with API keys; cheap password hashes only make setting up 50 users quick.
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    op = users.add_user(db, "op", "operator")[0]
    keys = [users.add_user(db, f"a{i}", "annotator")[2] for i in range(n)]
    warm_keys = [users.add_user(db, f"warm{i}", "annotator")[2] for i in range(warm)]
    prompts = [f"prompt {i}" for i in range(rounds + 3)]
    candidates = [[f"candidate {i}.{j}" for j in range(args.k)] for i in range(rounds + 3)]
    s = rk.create_set(db, op, "bench", prompts, candidates, annotators_per_item=n + warm)
    peer_db(tmp / "peer.db", prompts, candidates)
    print(f"labels bench: {n} annotators x {rounds} rankings (K={args.k}), think {args.think_ms:g} ms, data in {tmp}",
          flush=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    port, peer_port = free_port(), free_port()
    ours_proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(data),
                                  "--no-preload", "--no-worker"], cwd=ROOT, env=env,
                                 stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
    peer_proc = subprocess.Popen([sys.executable, "-m", "backend.bench.labels", "--serve-peer", str(peer_port),
                                  str(tmp / "peer.db")], cwd=ROOT, env=env,
                                 stdout=open(tmp / "peer.log", "wb"), stderr=subprocess.STDOUT)
    peer_keys = [f"a{i}" for i in range(n)]
    try:
        base, peer_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        wait_healthy(f"{base}/healthz", ours_proc)
        wait_healthy(f"{peer_base}/healthz", peer_proc)
        # Warm both up the same way (imports, connection pools, first queries).
        asyncio.run(annotate(base, warm_keys, s["id"], 3))
        asyncio.run(annotate(peer_base, [f"warm{i}" for i in range(warm)], s["id"], 3))
        think = args.think_ms / 1000
        ours = measure("ours", ours_proc, base, keys, s["id"], rounds, think)
        peer = measure("peer", peer_proc, peer_base, peer_keys, s["id"], rounds, think)
    finally:
        for proc in (ours_proc, peer_proc):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    by_hash = {users.sha256(k): k for k in keys}
    with db.read() as sess:
        stored = {(by_hash.get(h), item): order for h, item, order in sess.execute(
            select(User.api_key_hash, Ranking.item_id, Ranking.order).join(Ranking, Ranking.user_id == User.id))}
    peer_stored = {(u, item): json.loads(o) for u, item, o in
                   sqlite3.connect(tmp / "peer.db").execute("SELECT user, item, ord FROM rankings")}
    ours_lost, peer_lost = lost(ours["acked"], stored), lost(peer["acked"], peer_stored)
    print(f"rows lost: ours {ours_lost} of {len(ours['acked'])}, peer {peer_lost} of {len(peer['acked'])}", flush=True)

    import torch

    def row(metric, unit, key, ratio, **extra):
        return {"metric": metric, "unit": unit, "ours": round(ours[key], 2), "peer": round(peer[key], 2),
                "peer_name": PEER_NAME, "ratio": round(ratio, 3), **extra}

    print(json.dumps({"bench": "labels", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "annotators": n, "rounds": rounds, "think_ms": args.think_ms, "results": [
        row(f"submit p99 latency, {n} annotators", "ms", "p99", peer["p99"] / ours["p99"],
            goal=250.0, goal_met=ours["p99"] <= 250.0),
        row(f"submit p50 latency, {n} annotators", "ms", "p50", peer["p50"] / ours["p50"]),
        row("throughput (next + submit per ranking)", "rankings/s", "rate", ours["rate"] / peer["rate"]),
        row("server CPU per ranking (next + submit)", "ms", "cpu_ms", peer["cpu_ms"] / ours["cpu_ms"]),
        {"metric": "rows lost", "unit": "rows", "ours": ours_lost, "peer": peer_lost, "peer_name": PEER_NAME,
         "ratio": None, "goal": 0},
    ]}))


if __name__ == "__main__":
    main()
