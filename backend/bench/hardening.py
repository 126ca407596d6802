"""python -m backend.bench hardening [--import-mb 50] [--import-kind sft] [--annotators 20] [--think-ms 100]

Issue 13's battery against the real server (`python app.py`, SQLite file, loopback), five figures:
1. hostile Python snippets sent to /api/tools/python (as a signed-in learner): contained / tried. Each
   prints ESCAPED when its attack worked; contained means it did not, the call came back, the server
   still answers, and it left no process or file behind;
2. anonymous and annotator calls to every door they may not use: REST routes that write (POST, PUT,
   PATCH, DELETE) and every Gradio handler with a role rule: refused (401/403, a Gradio error) / tried;
3. bad inputs (oversize bodies, lone surrogates, broken JSON, out-of-range values...): answered 4xx /
   tried, and the slowest refusal's server CPU time;
4. annotators' submit p50/p99 while an operator imports a --import-mb file (each annotator: next item,
   submit, pause --think-ms, as `bench labels` does);
5. the same import again, the server killed with SIGKILL mid-import: acknowledged rankings lost (must be
   0), and rows of the killed import visible after the restart (must be 0).
A battery has no peer: the JSON results carry `peer` null. The figures depend on the machine's load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from backend.bench.labels import ROOT, annotate, cpu_seconds, free_port, lost, percentile, wait_healthy

NO_PEER = "none: a battery of refusals and containment, nothing to compare with"


# ---- 1. hostile snippets ------------------------------------------------------------------------------

def hostile_snippets(data_dir: Path, server_pid: int, port: int) -> dict[str, str]:
    """name -> code; the code prints ESCAPED when the attack worked."""
    return {
        "connect to the server's loopback port": f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2); print("ESCAPED")
except OSError as e: print("refused", e)""",
        "reach the internet": """
import socket
for addr in [("1.1.1.1", 80), ("8.8.8.8", 53)]:
    try:
        socket.create_connection(addr, timeout=2); print("ESCAPED", addr)
    except OSError as e: print("refused", e)""",
        "read the server's database": f"""
try:
    print("ESCAPED", len(open({str(data_dir / 'playground.db')!r}, 'rb').read()))
except OSError as e: print("refused", e)""",
        "write into the data directory": f"""
try:
    open({str(data_dir / 'pwned.txt')!r}, 'w').write('x'); print("ESCAPED")
except OSError as e: print("refused", e)""",
        "read /etc/shadow": """
try:
    print("ESCAPED", open('/etc/shadow').read()[:20])
except OSError as e: print("refused", e)""",
        "read the server's environment": """
import os
print("ESCAPED" if "HARDENING_CANARY" in os.environ else "clean env")
try:
    print("ESCAPED" if b"HARDENING_CANARY" in open('/proc/1/environ', 'rb').read() else "clean /proc/1")
except OSError as e: print("refused", e)""",
        "see the server's process": f"""
import os
print("ESCAPED" if os.path.exists('/proc/{server_pid}/cmdline') and b'app.py' in open('/proc/{server_pid}/cmdline', 'rb').read() else "not visible")""",
        "kill the server": f"""
import os, signal
for pid in ({server_pid}, os.getppid(), 1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e: print("refused", pid, e)""",
        "fork bomb": """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass""",
        "memory bomb": """
xs = []
while True:
    xs.append(bytearray(50 << 20))""",
        "CPU spin": "while True: pass",
        "sleep past the wall clock": "import time; time.sleep(600)",
        "output flood": "import sys\nwhile True: sys.stdout.write('x' * 65536)",
        "fill the disk": """
with open('fill', 'wb') as f:
    while True: f.write(b'x' * (1 << 20))""",
        "thread bomb": """
import threading, time
while True:
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()""",
        "leave a process running": """
import subprocess
subprocess.Popen(['sleep', '4242'], start_new_session=True)
import os
if os.fork() == 0:
    os.setsid(); os.execvp('sleep', ['sleep', '4243'])
print("started")""",
        "write outside the working directory": """
for p in ['/usr/pwned', '/etc/pwned', '/home/pwned', '/root/pwned']:
    try:
        open(p, 'w').write('x'); print("ESCAPED", p)
    except OSError as e: print("refused", p, e.errno)""",
        "escalate with setuid/unshare": """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print("ESCAPED setuid" if os.geteuid() != 0 and libc.setuid(0) == 0 else "no setuid")
try:
    open('/proc/sysrq-trigger', 'w').write('h'); print("ESCAPED sysrq")
except OSError as e: print("refused", e)""",
        "load a kernel module / mount the host": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.mount(b"/dev/sda1", b"/mnt", b"ext4", 0, None)
print("ESCAPED mount" if rc == 0 else "mount refused")""",
    }


def stray_sleepers() -> list[int]:
    """Host processes a snippet tried to leave behind (sleep 4242 / 4243)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().split(b"\0")[:2] in ([b"sleep", b"4242"], [b"sleep", b"4243"]):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def run_snippets(base: str, key: str, data_dir: Path, proc: subprocess.Popen, port: int) -> dict:
    tried, contained, failures = 0, 0, []
    for name, code in hostile_snippets(data_dir, proc.pid, port).items():
        tried += 1
        t = time.perf_counter()
        try:
            r = httpx.post(f"{base}/api/tools/python", json={"code": code}, headers={"Authorization": f"Bearer {key}"},
                           timeout=120)
            text, status = r.text, r.status_code
        except httpx.HTTPError as e:
            text, status = repr(e), None
        took = time.perf_counter() - t
        alive = proc.poll() is None and httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        ok = (status == 200 and "ESCAPED" not in text and alive and not stray_sleepers()
              and not (data_dir / "pwned.txt").exists())
        contained += ok
        if not ok:
            failures.append({"snippet": name, "status": status, "answer": text[:300], "server_alive": alive})
        try:
            said = json.loads(text)["text"].replace("\n", " | ")[:100]
        except (ValueError, KeyError, TypeError):
            said = text[:100]
        print(f"  sandbox: {name}: {'contained' if ok else 'NOT CONTAINED'} ({status}, {took:.1f}s): {said}", flush=True)
    return {"tried": tried, "contained": contained, "failures": failures}


# ---- 2. doors -----------------------------------------------------------------------------------------

def rest_doors() -> list[tuple[str, str, str]]:
    """(method, path with ids filled in, rule) for every REST route that writes."""
    from importlib import import_module

    from fastapi.routing import APIRoute

    from backend.api import ROUTES
    out = []
    for module, _ in ROUTES:
        for route in import_module(f"backend.api.{module}").router.routes:
            if not isinstance(route, APIRoute):
                continue
            rule = next((d.call.required_role for d in route.dependant.dependencies
                         if getattr(d.call, "required_role", None)), None)
            path = route.path
            for param in route.param_convertors:
                path = path.replace("{" + param + "}", "1")
            out += [(m, path, rule) for m in sorted(route.methods) if m in ("POST", "PUT", "PATCH", "DELETE")]
    return out


def gradio_rules(data_dir: Path) -> dict[str, str]:
    """api_name -> rule of every Gradio handler, from the UI built the way the server builds it."""
    from backend.config import AppConfig
    from backend.playground import Playground
    from ui import build_ui
    blocks = build_ui(Playground(AppConfig(data_dir=data_dir, start_worker=False, preload=False)))
    return {bf.api_name: bf.fn.door_rule for bf in blocks.fns.values() if bf.fn is not None and bf.api_name}


def forbidden(rule: str | None, role: str | None) -> bool:
    """Whether `role` (None: anonymous) may not pass `rule` (with open inference, the default)."""
    from backend.users import ROLE_RANK
    if rule in ("public", "inference"):
        return False
    return role is None or rule not in ROLE_RANK or ROLE_RANK[role] < ROLE_RANK[rule]


def run_doors(base: str, ann_key: str, ann_cookies: dict, gradio: dict[str, str]) -> dict:
    from tests.helpers import gradio_call, gradio_handlers  # the tests' Gradio client (POST /gradio_api/call)
    out = {}
    for who, headers, cookies, role in [("anonymous", {}, None, None),
                                        ("annotator", {"Authorization": f"Bearer {ann_key}"}, ann_cookies, "annotator")]:
        tried, refused, open_doors = {"rest": 0, "gradio": 0}, {"rest": 0, "gradio": 0}, []
        with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
            for method, path, rule in rest_doors():
                if not forbidden(rule, role):
                    continue
                tried["rest"] += 1
                r = c.request(method, path, json={})
                if r.status_code in (401, 403):
                    refused["rest"] += 1
                else:
                    open_doors.append(f"{method} {path} -> {r.status_code}")
        inputs = gradio_handlers(base)
        for name, rule in sorted(gradio.items()):
            if not forbidden(rule, role) or name not in inputs:
                continue
            tried["gradio"] += 1
            kind, payload = gradio_call(base, name, inputs[name], cookies=cookies)
            if kind == "error":
                refused["gradio"] += 1
            else:
                open_doors.append(f"gradio {name} -> {kind}")
        print(f"  doors, {who}: REST {refused['rest']} refused / {tried['rest']} tried, Gradio {refused['gradio']} / "
              f"{tried['gradio']}" + (f"; open: {open_doors}" if open_doors else ""), flush=True)
        out[who] = {"tried": sum(tried.values()), "refused": sum(refused.values()), "rest": [refused["rest"], tried["rest"]],
                    "gradio": [refused["gradio"], tried["gradio"]], "open": open_doors}
    return out


# ---- 3. bad inputs ------------------------------------------------------------------------------------

def bad_inputs(op_key: str) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx request kwargs)."""
    op = {"Authorization": f"Bearer {op_key}"}
    surrogate = b'{"name": "\\ud800", "password": "\\ud800"}'
    big = b"x" * (50 * 2**20)
    chat = lambda content: {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    return [
        ("50 MB chat body", "POST", "/v1/chat/completions", {"content": b'{"model": "tiny", "messages": [{"role": "user", "content": "' + big + b'"}]}', "headers": {"Content-Type": "application/json"}}),
        ("1 M-character prompt under the body limit", "POST", "/v1/chat/completions", {"json": chat("y " * 500_000)}),
        ("1 M-character completion prompt", "POST", "/api/completion/generate", {"json": {"model": "tiny", "prompt": "y " * 500_000}}),
        ("70 MB import (over the import limit)", "POST", "/api/imports/sft", {"content": big + big[:20 * 2**20], "headers": op}),
        ("lone surrogate at login", "POST", "/api/login", {"content": surrogate, "headers": {"Content-Type": "application/json"}}),
        ("lone surrogate in an SFT demo", "POST", "/api/sft/demos", {"content": b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "headers": {**op, "Content-Type": "application/json"}}),
        ("lone surrogate as Python code", "POST", "/api/tools/python", {"content": b'{"code": 5, "x": "\\ud800"}', "headers": {**op, "Content-Type": "application/json"}}),
        ("lone surrogate in a search", "POST", "/api/tools/search", {"content": b'{"query": "\\ud800", "k": -1}', "headers": {**op, "Content-Type": "application/json"}}),
        ("lone surrogate in a document", "POST", "/api/documents", {"content": b'{"title": "\\ud800"}', "headers": {**op, "Content-Type": "application/json"}}),
        ("lone surrogate in a ranking set", "POST", "/api/ranking-sets", {"content": b'{"name": "\\ud800", "prompts": 3}', "headers": {**op, "Content-Type": "application/json"}}),
        ("broken JSON", "POST", "/api/ranking-sets", {"content": b'{"name": ', "headers": {**op, "Content-Type": "application/json"}}),
        ("JSON nested 100 000 deep", "POST", "/api/ranking-sets", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {**op, "Content-Type": "application/json"}}),
        ("non-UTF-8 import", "POST", "/api/imports/rankings", {"content": b"\xff\xfe\x00garbage\n" * 1000, "headers": op}),
        ("import of an unknown kind", "POST", "/api/imports/nonsense", {"content": b"{}", "headers": op}),
        ("negative max_tokens", "POST", "/v1/chat/completions", {"json": {**chat("hi"), "max_tokens": -5}}),
        ("temperature 1e308", "POST", "/v1/chat/completions", {"json": {**chat("hi"), "temperature": 1e308}}),
        ("unknown model", "POST", "/v1/chat/completions", {"json": {**chat("hi"), "model": "no-such-model"}}),
        ("messages of the wrong type", "POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": "hi"}}),
        ("a ranking that is not a permutation", "POST", "/api/rankings/items/1", {"json": {"order": [1, 1, 1]}, "headers": op}),
        ("Python code over the length limit", "POST", "/api/tools/python", {"json": {"code": "#" * 100_000}, "headers": op}),
        ("ranking set with 10 000 empty prompts", "POST", "/api/ranking-sets", {"json": {"name": "x", "prompts": [""] * 10_000, "candidates": []}, "headers": op}),
        ("tokenize a 5 MB text (over the body limit)", "POST", "/api/tokenize", {"json": {"text": "z" * (5 * 2**20)}}),
    ]


def run_bad_inputs(base: str, proc: subprocess.Popen, op_key: str) -> dict:
    tried, refused, slowest, answers = 0, 0, (0.0, ""), []
    with httpx.Client(base_url=base, timeout=300) as c:
        for name, method, path, kwargs in bad_inputs(op_key):
            tried += 1
            cpu0 = cpu_seconds(proc.pid)
            try:
                status = c.request(method, path, **kwargs).status_code
            except httpx.HTTPError as e:
                status = f"{type(e).__name__}"
            cpu = cpu_seconds(proc.pid) - cpu0
            is_4xx = isinstance(status, int) and 400 <= status < 500
            refused += is_4xx
            if is_4xx and cpu > slowest[0]:
                slowest = (cpu, name)
            answers.append({"input": name, "status": status, "server_cpu_s": round(cpu, 3)})
            print(f"  bad input: {name}: {status}, server CPU {cpu * 1e3:.0f} ms", flush=True)
    return {"tried": tried, "refused": refused, "slowest_cpu_s": round(slowest[0], 3), "slowest": slowest[1],
            "answers": answers}


def wrong_passwords(base: str) -> int | None:
    """20 wrong passwords in a row: the try that first got 429 (the throttle), None if none did. Run last:
    a throttled address stays throttled for a while."""
    statuses = [httpx.post(f"{base}/api/login", json={"name": "op", "password": f"wrong{i}"}).status_code for i in range(20)]
    first_429 = statuses.index(429) + 1 if 429 in statuses else None
    print(f"  20 wrong passwords: {statuses.count(401)} x 401, {statuses.count(429)} x 429 (first at try {first_429})",
          flush=True)
    return first_429


# ---- 4, 5. annotators during a big import, and a kill -9 in the middle of one --------------------------

def import_file(path: Path, kind: str, mb: float) -> None:
    """About `mb` MB of valid JSONL of `kind`, ~1 KB a row."""
    filler = "lorem ipsum dolor sit amet " * 8
    with open(path, "w") as f:
        i = 0
        while f.tell() < mb * 2**20:
            if kind == "sft":
                row = {"messages": [{"role": "user", "content": f"question {i} {filler}"},
                                    {"role": "assistant", "content": f"answer {i} {filler} {filler}"}]}
            else:
                row = {"prompt": f"prompt {i} {filler}", "candidates": [f"answer {i}.{j} {filler}" for j in range(4)],
                       "ranking": [3, 1, 0, 2]}
            f.write(json.dumps(row) + "\n")
            i += 1


async def annotate_during_import(base: str, keys: list[str], set_id: int, op_key: str, path: Path, kind: str,
                                 think: float, kill: subprocess.Popen | None = None, db=None) -> dict:
    """Annotators rank until the import answers (or, with `kill`, until the server is SIGKILLed once the
    import has staged rows); returns latencies, acknowledged rankings and the import's answer."""
    stop = asyncio.Event()

    async def importer():
        t = time.perf_counter()
        try:
            async with httpx.AsyncClient(base_url=base, timeout=3600) as c:
                r = await c.post(f"/api/imports/{kind}", params={"name": "bench"}, content=path.read_bytes(),
                                 headers={"Authorization": f"Bearer {op_key}"})
                return {"status": r.status_code, "answer": r.json(), "seconds": time.perf_counter() - t}
        except httpx.HTTPError as e:
            return {"status": None, "answer": repr(e), "seconds": time.perf_counter() - t}
        finally:
            stop.set()

    async def killer():  # once the import has staged half its rows
        rows = sum(1 for _ in open(path, "rb"))
        while staged(db) < rows // 2 and not stop.is_set():
            await asyncio.sleep(0.05)
        if not stop.is_set():
            kill.send_signal(signal.SIGKILL)
            print(f"  SIGKILL sent to the server mid-import ({staged(db)} rows staged)", flush=True)

    tasks = [importer(), annotate(base, keys, set_id, 10**6, think, stop=stop)] + ([killer()] if kill else [])
    imp, (lat, acked, wall), *_ = await asyncio.gather(*tasks)
    return {"import": imp, "lat": lat, "acked": acked, "wall": wall}


async def annotate_for(base: str, keys: list[str], set_id: int, think: float, seconds: float) -> list[float]:
    """The same annotators for `seconds` with no import: the baseline; returns submit latencies."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    lat, _, _ = await annotate(base, keys, set_id, 10**6, think, stop=stop)
    return lat


def staged(db) -> int:
    from sqlalchemy import func, select

    from backend.db.models import Import, RankingItem, RankingSet, SFTDemo
    from backend.labels.visibility import PUBLISHED
    # rows of imports not published: staging, or dropped but not yet deleted
    with db.read() as s:
        return (s.scalar(select(func.count()).select_from(SFTDemo).join(Import, Import.id == SFTDemo.import_id)
                         .where(Import.state != PUBLISHED))
                + s.scalar(select(func.count()).select_from(RankingItem).join(RankingSet)
                           .join(Import, Import.id == RankingSet.import_id).where(Import.state != PUBLISHED)))


def start_server(data: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARDENING_CANARY": "the server's secret"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data), "--no-preload", "--no-worker"], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend.bench hardening", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--import-mb", type=float, default=50)
    p.add_argument("--import-kind", choices=("sft", "rankings", "preferences"), default="sft")
    p.add_argument("--annotators", type=int, default=20)
    p.add_argument("--think-ms", type=float, default=100, help="each annotator's pause between submissions")
    p.add_argument("--skip", nargs="*", default=[], choices=("sandbox", "doors", "inputs", "import"))
    args = p.parse_args(argv)

    from argon2 import PasswordHasher
    from sqlalchemy import select

    from backend import users
    from backend.db import Database
    from backend.db.models import Ranking, User
    from backend.labels import rankings as rk
    from backend.labels.exchange import export_sft

    tmp = Path(tempfile.mkdtemp(prefix="bench-hardening-"))
    data = tmp / "data"
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)  # quick to set up; the server verifies keys
    op_user, _, op_key = users.add_user(db, "op", "operator")
    _, lea_pw, lea_key = users.add_user(db, "lea", "learner")
    _, ann_pw, ann_key = users.add_user(db, "ann", "annotator")
    keys = [users.add_user(db, f"a{i}", "annotator")[2] for i in range(args.annotators)]
    n_items = 3000  # more than any annotator gets through during one import
    s = rk.create_set(db, op_user, "bench", [f"prompt {i}" for i in range(n_items)],
                      [[f"candidate {i}.{j}" for j in range(4)] for i in range(n_items)], annotators_per_item=len(keys))
    print(f"hardening battery: data in {tmp}", flush=True)
    results, port, log = [], free_port(), tmp / "server.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_server(data, port, log)
    try:
        if "sandbox" not in args.skip:
            sb = run_snippets(base, lea_key, data, proc, port)
            results.append({"metric": "hostile sandbox snippets contained", "unit": "snippets", "ours": sb["contained"],
                            "tried": sb["tried"], "failures": sb["failures"]})
        if "doors" not in args.skip:
            login = httpx.post(f"{base}/api/login", json={"name": "ann", "password": ann_pw})
            doors = run_doors(base, ann_key, dict(login.cookies), gradio_rules(tmp / "ui-data"))
            for who, d in doors.items():
                results.append({"metric": f"{who} calls to doors it may not use, refused", "unit": "calls",
                                "ours": d["refused"], "tried": d["tried"], "rest_refused_tried": d["rest"],
                                "gradio_refused_tried": d["gradio"], "open": d["open"]})
        if "inputs" not in args.skip:
            bad = run_bad_inputs(base, proc, op_key)
            results.append({"metric": "bad inputs answered 4xx", "unit": "requests", "ours": bad["refused"],
                            "tried": bad["tried"], "answers": bad["answers"]})
            results.append({"metric": "slowest refusal's server CPU", "unit": "s", "ours": bad["slowest_cpu_s"],
                            "input": bad["slowest"]})
        if "import" not in args.skip:
            path = tmp / f"import.{args.import_kind}.jsonl"
            import_file(path, args.import_kind, args.import_mb)
            mb = path.stat().st_size / 2**20
            think = args.think_ms / 1000
            idle = asyncio.run(annotate_for(base, keys, s["id"], think, seconds=20))
            results.append({"metric": "annotator submit p99 with no import (same load)", "unit": "ms",
                            "ours": round(percentile(idle, 99) * 1e3, 1), "submits": len(idle)})
            print(f"  no import: {len(idle)} rankings in 20 s, submit p50 {percentile(idle, 50) * 1e3:.0f} ms, "
                  f"p99 {percentile(idle, 99) * 1e3:.0f} ms", flush=True)
            run = asyncio.run(annotate_during_import(base, keys, s["id"], op_key, path, args.import_kind, think))
            lat = run["lat"]
            print(f"  {mb:.1f} MB {args.import_kind} import: {run['import']['status']} in {run['import']['seconds']:.1f}s; "
                  f"{len(run['acked'])} rankings meanwhile, submit p50 {percentile(lat, 50) * 1e3:.0f} ms, "
                  f"p99 {percentile(lat, 99) * 1e3:.0f} ms, max {max(lat) * 1e3:.0f} ms", flush=True)
            results += [
                {"metric": f"annotator submit p99 during a {mb:.0f} MB {args.import_kind} import", "unit": "ms",
                 "ours": round(percentile(lat, 99) * 1e3, 1), "goal": 250.0, "annotators": len(keys),
                 "think_ms": args.think_ms, "submits": len(lat)},
                {"metric": f"annotator submit p50 during the import", "unit": "ms", "ours": round(percentile(lat, 50) * 1e3, 1)},
                {"metric": f"{mb:.0f} MB {args.import_kind} import time", "unit": "s",
                 "ours": round(run["import"]["seconds"], 1), "status": run["import"]["status"]},
            ]
            sets_before = len(rk.list_sets(db))
            killed = asyncio.run(annotate_during_import(base, keys, s["id"], op_key, path, args.import_kind, think,
                                                        kill=proc, db=db))
            proc.wait()
            if killed["import"]["status"] is not None:
                print(f"  the import answered {killed['import']['status']} before the kill: make it bigger", flush=True)
            left = staged(db)
            proc = start_server(data, port, log)  # drops what the killed import staged
            by_hash = {users.sha256(k): k for k in keys}
            with db.read() as sess:
                stored = {(by_hash.get(h), item): order for h, item, order in sess.execute(
                    select(User.api_key_hash, Ranking.item_id, Ranking.order).join(Ranking, Ranking.user_id == User.id))}
            n_lost = lost(killed["acked"], stored)
            if args.import_kind == "sft":  # rows of the killed import anyone can see: demos beyond the first import's
                visible = len(export_sft(db)) - run["import"]["answer"]["rows"]
            else:  # or sets beyond those the first import made
                visible = len(rk.list_sets(db)) - sets_before
            print(f"  kill -9 mid-import: {n_lost} of {len(killed['acked'])} acknowledged rankings lost; "
                  f"{left} staged rows left by the kill, {staged(db)} after the restart; "
                  f"{visible} rows or sets of the killed import visible", flush=True)
            results += [{"metric": "acknowledged rankings lost after kill -9 mid-import", "unit": "rows", "ours": n_lost,
                         "acknowledged": len(killed["acked"]), "goal": 0},
                        {"metric": "staged rows of the killed import left after the restart", "unit": "rows",
                         "ours": staged(db), "left_by_the_kill": left, "goal": 0},
                        {"metric": "rows (sft) or sets (rankings) of the killed import visible", "unit": "rows",
                         "ours": visible, "goal": 0}]
        if "inputs" not in args.skip:
            results.append({"metric": "wrong passwords before the first 429", "unit": "tries", "ours": wrong_passwords(base)})
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        db.close()

    import torch
    for r in results:
        r.setdefault("peer", None), r.setdefault("peer_name", NO_PEER), r.setdefault("ratio", None)
    print(json.dumps({"bench": "hardening", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "caveat": "a shared 2-core machine loaded by other work: latencies and CPU times are noisy",
                      "results": results}))


if __name__ == "__main__":
    main()
