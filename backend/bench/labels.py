"""python -m backend.bench labels [--annotators 50] [--rounds 20]

N annotators submit rankings over HTTP at the same time, each as its own client: get the next item,
post its order, repeat. Ours is the real server (`python app.py`, SQLite file, API-key auth, queue,
validation, upsert). Peer: a minimal FastAPI endpoint doing one plain sqlite3 INSERT per request
(same WAL + synchronous=NORMAL durability), under the same load from the same client, in the same run.
Reports submissions/s, p50/p99 latency of the submitting POST, and rows lost (acknowledged but not in
the database afterwards; must be 0). Goal (issue 5): 50 annotators, p99 <= 250 ms.
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

ROOT = Path(__file__).resolve().parents[2]


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


# ---- peer: the least a server can do to store a ranking ------------------------------------------

def serve_peer(port: int, db_path: str) -> None:
    import threading

    import uvicorn
    from fastapi import FastAPI

    con = sqlite3.connect(db_path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS rankings (id INTEGER PRIMARY KEY, user TEXT, item INTEGER, ord TEXT)")
    con.close()
    local = threading.local()
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/submit")
    def submit(body: dict):
        if not hasattr(local, "con"):
            local.con = sqlite3.connect(db_path, timeout=30, isolation_level=None)
            local.con.execute("PRAGMA synchronous=NORMAL")
        local.con.execute("INSERT INTO rankings (user, item, ord) VALUES (?, ?, ?)",
                          (body["user"], body["item"], json.dumps(body["order"])))
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- load ------------------------------------------------------------------------------------------

async def run_ours(base: str, keys: list[str], set_id: int, rounds: int, think: float = 0.0) -> tuple[list[float], list[tuple], float]:
    latencies, acked = [], []

    async def annotator(key: str):
        async with httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
            for _ in range(rounds):
                item = (await c.get("/api/rankings/next", params={"set_id": set_id})).json()
                if item.get("done"):
                    return
                order = [x["id"] for x in item["candidates"]][::-1]
                t = time.perf_counter()
                r = await c.post(f"/api/rankings/items/{item['item_id']}", json={"order": order})
                latencies.append(time.perf_counter() - t)
                if r.status_code == 200:
                    acked.append((key, item["item_id"], order))
                await asyncio.sleep(think)

    t0 = time.perf_counter()
    await asyncio.gather(*(annotator(k) for k in keys))
    return latencies, acked, time.perf_counter() - t0


async def run_peer(base: str, n: int, rounds: int, think: float = 0.0) -> tuple[list[float], int, float]:
    latencies, acked = [], 0

    async def annotator(i: int):
        nonlocal acked
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            for j in range(rounds):
                t = time.perf_counter()
                r = await c.post("/submit", json={"user": f"a{i}", "item": j, "order": [4, 3, 2, 1]})
                latencies.append(time.perf_counter() - t)
                acked += r.status_code == 200
                await asyncio.sleep(think)

    t0 = time.perf_counter()
    await asyncio.gather(*(annotator(i) for i in range(n)))
    return latencies, acked, time.perf_counter() - t0


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

    n, rounds = args.annotators, args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="bench-labels-"))
    data = tmp / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    # The bench signs in with API keys; cheap password hashes only make setting up 50 users quick.
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    op = users.add_user(db, "op", "operator")[0]
    keys = [users.add_user(db, f"a{i}", "annotator")[2] for i in range(n)]
    s = rk.create_set(db, op, "bench", [f"prompt {i}" for i in range(rounds + 1)],
                      [[f"candidate {i}.{j}" for j in range(args.k)] for i in range(rounds + 1)],
                      annotators_per_item=n)
    print(f"labels bench: {n} annotators x {rounds} rankings (K={args.k}), data in {tmp}", flush=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    port, peer_port = free_port(), free_port()
    ours = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(data),
                             "--no-preload", "--no-worker"], cwd=ROOT, env=env,
                            stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
    peer = subprocess.Popen([sys.executable, "-m", "backend.bench.labels", "--serve-peer", str(peer_port),
                             str(tmp / "peer.db")], cwd=ROOT, env=env,
                            stdout=open(tmp / "peer.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", ours)
        wait_healthy(f"http://127.0.0.1:{peer_port}/healthz", peer)
        base, peer_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        # Warm up both (imports, connection pools, first queries).
        asyncio.run(run_peer(peer_base, 4, 5))
        warm_key = users.add_user(db, "warmup", "annotator")[2]
        asyncio.run(run_ours(base, [warm_key], s["id"], 3))

        think = args.think_ms / 1000
        cpu0 = cpu_seconds(ours.pid)
        lat, acked, wall = asyncio.run(run_ours(base, keys, s["id"], rounds, think))
        cpu_ours = (cpu_seconds(ours.pid) - cpu0) / max(1, len(acked)) * 1e3
        print(f"ours: {len(acked)} rankings in {wall:.2f}s = {len(acked) / wall:.1f}/s; "
              f"p50 {percentile(lat, 50) * 1e3:.1f} ms, p99 {percentile(lat, 99) * 1e3:.1f} ms; "
              f"server CPU {cpu_ours:.2f} ms per ranking (next + submit)", flush=True)
        cpu0 = cpu_seconds(peer.pid)
        plat, packed, pwall = asyncio.run(run_peer(peer_base, n, rounds, think))
        cpu_peer = (cpu_seconds(peer.pid) - cpu0) / max(1, packed) * 1e3
        print(f"peer: {packed} inserts in {pwall:.2f}s = {packed / pwall:.1f}/s; "
              f"p50 {percentile(plat, 50) * 1e3:.1f} ms, p99 {percentile(plat, 99) * 1e3:.1f} ms; "
              f"server CPU {cpu_peer:.2f} ms per insert", flush=True)
    finally:
        for proc in (ours, peer):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    # Rows lost: acknowledged rankings that are not in the database with the acknowledged order.
    by_key = {users.sha256(k): k for k in keys}
    with db.read() as sess:
        stored = {(by_key.get(h), item): order for h, item, order in sess.execute(
            select(User.api_key_hash, Ranking.item_id, Ranking.order).join(Ranking, Ranking.user_id == User.id))}
    lost = sum(stored.get((k, item)) != order for k, item, order in acked)
    peer_rows = sqlite3.connect(tmp / "peer.db").execute("select count(*) from rankings").fetchone()[0]
    peer_lost = packed + 5 * 4 - peer_rows
    print(f"rows lost: ours {lost} of {len(acked)}, peer {peer_lost} of {packed}", flush=True)

    import torch
    p99, pp99 = percentile(lat, 99) * 1e3, percentile(plat, 99) * 1e3
    print(json.dumps({"bench": "labels", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "annotators": n, "rounds": rounds, "think_ms": args.think_ms, "results": [
        {"metric": f"submit p99 latency, {n} annotators", "unit": "ms", "ours": round(p99, 1), "peer": round(pp99, 1),
         "peer_name": "minimal FastAPI endpoint, one plain sqlite3 INSERT", "ratio": round(pp99 / p99, 3),
         "goal": 250.0, "goal_met": p99 <= 250.0},
        {"metric": f"submit p50 latency, {n} annotators", "unit": "ms", "ours": round(percentile(lat, 50) * 1e3, 1),
         "peer": round(percentile(plat, 50) * 1e3, 1), "peer_name": "minimal FastAPI endpoint, one plain sqlite3 INSERT",
         "ratio": round(percentile(plat, 50) / percentile(lat, 50), 3)},
        {"metric": "throughput (ours: next + submit per ranking)", "unit": "rankings/s", "ours": round(len(acked) / wall, 1),
         "peer": round(packed / pwall, 1), "peer_name": "minimal FastAPI endpoint, one plain sqlite3 INSERT",
         "ratio": round((len(acked) / wall) / (packed / pwall), 3)},
        {"metric": "server CPU per ranking (ours: next + submit)", "unit": "ms", "ours": round(cpu_ours, 2),
         "peer": round(cpu_peer, 2), "peer_name": "minimal FastAPI endpoint, one plain sqlite3 INSERT",
         "ratio": round(cpu_peer / cpu_ours, 3)},
        {"metric": "rows lost", "unit": "rows", "ours": lost, "peer": peer_lost,
         "peer_name": "minimal FastAPI endpoint, one plain sqlite3 INSERT", "ratio": None, "goal": 0},
    ]}))


if __name__ == "__main__":
    main()
