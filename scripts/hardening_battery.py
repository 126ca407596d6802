"""The hardening battery (issue 13): attacks a real server on loopback and prints the closing note's figures.

    .venv/bin/python scripts/hardening_battery.py [--import-mb 50] [--annotators 4]

1. hostile Python snippets through /api/tools/python: contained / tried
2. anonymous and annotator calls to every guarded door (REST routes and Gradio handlers): refused / tried
3. bad inputs answered 4xx / tried, and the slowest refusal's server CPU time
4. annotator SFT submits during a big SFT import: p50 / p99 / max latency
5. kill -9 during a second big import: acknowledged labels lost after restart (must be 0), staged rows left
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_server  # noqa: E402
from tests.helpers import add_user, gradio_call, gradio_handlers, register_tiny_model  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- 1. the sandbox ---------------------------------------------------------------------------------
def hostile(server) -> list[tuple[str, str]]:
    """(name, code); a snippet is contained when its output holds none of LEAKS and the server stays healthy."""
    port = server.base_url.rsplit(":", 1)[1]
    data = str(server.data_dir)
    return [
        ("read /etc/passwd", "print(open('/etc/passwd').read())"),
        ("list the data dir", f"import os; print(os.listdir({data!r}))"),
        ("read the database", f"print(open({data + '/playground.db'!r}, 'rb').read(200))"),
        ("list /root", "import os; print(os.listdir('/root'))"),
        ("read the project", f"print(open({str(ROOT / 'app.py')!r}).read())"),
        ("connect to the server", f"import socket; s=socket.create_connection(('127.0.0.1', {port}), 2); print('CONNECTED')"),
        ("fetch /healthz", f"import urllib.request; print('FETCHED', urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=2).read())"),
        ("connect out", "import socket; socket.create_connection(('1.1.1.1', 53), 2); print('CONNECTED')"),
        ("fork bomb", "import os\nwhile True:\n    os.fork()"),
        ("memory bomb", "x = 'x' * (8 * 2**30); print('ALLOCATED')"),
        # 16 children each touch 200 MB (under the 256 MB per-process limit): the tree's cgroup caps them at
        # memory_mb + tmp_mb (272 MB), so at most one may get its 200 MB
        ("memory in many processes", "import os, time\nfor _ in range(16):\n    if os.fork() == 0:\n"
                                     "        x = bytearray(200 * 2**20); print('ALLOCATED', flush=True); time.sleep(3); os._exit(0)\n"
                                     "time.sleep(4)"),
        ("endless loop", "while True: pass"),
        ("sleep forever", "import time; time.sleep(10**6); print('WOKE')"),
        ("output flood", "print('y' * 50_000_000)"),
        ("kill the parent", "import os, signal; os.kill(os.getppid(), signal.SIGKILL); os.kill(1, signal.SIGKILL)"),
        ("environment secrets", "import os; print(dict(os.environ))"),
        ("pid 1's environment", "print(open('/proc/1/environ', 'rb').read())"),
        ("write to /usr", "open('/usr/pwned', 'w').write('x'); print('WROTE')"),
        ("mount", "import ctypes; libc = ctypes.CDLL(None); print('MOUNTED' if libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0 else 'no')"),
        ("escape daemon", "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(600)\nprint('left a daemon')"),
    ]


LEAKS = ("root:x:0:0", "SQLite format", "CONNECTED", "FETCHED", "ALLOCATED", "WOKE", "WROTE", "MOUNTED",
         "build_app", "PLAYGROUND", "pk_", "DATABASE_URL", "playground.db'", "server-")


def sandbox_figures(server, key: str) -> dict:
    contained, rows = 0, []
    with httpx.Client(base_url=server.base_url, headers=bearer(key), timeout=120) as c:
        for name, code in hostile(server):
            r = c.post("/api/tools/python", json={"code": code})
            # only what the code printed counts (a traceback on stderr echoes the source line, markers included)
            text = r.json().get("stdout", "") if r.status_code == 200 else ""
            leaked = [m for m in LEAKS if m in text] if r.status_code == 200 else ["status %d" % r.status_code]
            if name == "memory in many processes":
                leaked = ["ALLOCATED x%d" % text.count("ALLOCATED")] if text.count("ALLOCATED") > 1 else []
            healthy = c.get("/healthz").status_code == 200
            ok = not leaked and healthy
            contained += ok
            rows.append({"snippet": name, "contained": ok, "leaked": leaked,
                         "ended": r.json().get("killed_reason") if r.status_code == 200 else None})
    return {"contained": contained, "tried": len(rows), "rows": rows}


# ---- 2. every guarded door --------------------------------------------------------------------------
def door_rules() -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    from importlib import import_module

    from fastapi.routing import APIRoute

    from backend.api import ROUTES
    from backend.config import AppConfig
    from backend.playground import Playground
    from ui import build_ui
    rest = []
    for module, _ in ROUTES:
        for r in import_module(f"backend.api.{module}").router.routes:
            if isinstance(r, APIRoute):
                rule = next((d.call.required_role for d in r.dependant.dependencies
                             if getattr(d.call, "required_role", None)), None)
                rest += [(m, r.path, rule) for m in sorted(r.methods)]
    with tempfile.TemporaryDirectory() as d:
        pg = Playground(AppConfig(data_dir=Path(d), start_worker=False, preload=False))
        blocks = build_ui(pg)
        gradio = {bf.api_name: bf.fn.door_rule for bf in blocks.fns.values() if bf.fn is not None}
        pg.db.close() if hasattr(pg.db, "close") else None
    return rest, gradio


def access_figures(server, people: dict) -> dict:
    rest, gradio = door_rules()
    out = {"anonymous": [0, 0], "annotator": [0, 0], "failures": []}
    above = {"operator", "admin"}
    ann = people["ann0"]
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        for method, path, rule in rest:
            if method not in ("POST", "PUT", "PATCH", "DELETE") or rule in ("public", "inference"):
                continue
            url = re.sub(r"\{[^}]+\}", "999999", path)
            for who, headers, expect in (("anonymous", {}, 401), ("annotator", bearer(ann[1]), 403)):
                if who == "annotator" and rule not in above:
                    continue
                got = c.request(method, url, headers=headers, json={}).status_code
                out[who][1] += 1
                out[who][0] += got == expect
                if got != expect:
                    out["failures"].append(f"{who} {method} {path}: {got}")
        for tool in ("python", "search"):  # the /v1 tool door
            body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools_enabled": True,
                    "assistant_prefix": f'<tool_call>{{"name": "{tool}", "arguments": {{"code": "print(1)", "query": "x"}}}}</tool_call>'}
            got = c.post("/v1/chat/completions", json=body).status_code
            out["anonymous"][1] += 1
            out["anonymous"][0] += got == 401
        cookie = dict(c.post("/api/login", json={"name": "ann0", "password": ann[0]}).cookies)
    inputs = gradio_handlers(server.base_url)
    for api_name, rule in gradio.items():
        if rule in ("public", "inference") or api_name not in inputs:
            continue
        for who, cookies in (("anonymous", None), ("annotator", cookie)):
            if who == "annotator" and rule not in above:
                continue
            kind, payload = gradio_call(server.base_url, api_name, inputs[api_name], cookies=cookies)
            refused = kind == "error" and ("Log in" in json.dumps(payload) or "role" in json.dumps(payload))
            out[who][1] += 1
            out[who][0] += refused
            if not refused:
                out["failures"].append(f"{who} gradio {api_name}: {kind} {str(payload)[:80]}")
    return out


# ---- 3. bad inputs ----------------------------------------------------------------------------------
def bad_input_figures(server, people: dict) -> dict:
    lea, ann, op = people["lea"][1], people["ann0"][1], people["op"][1]
    huge = b"x" * (50 * 2**20)

    def chunked():
        for _ in range(50):
            yield b"y" * 2**20
    s = '"\\ud800"'
    cases = [
        ("50 MB chat body", "POST", "/v1/chat/completions", {}, {"content": huge}),
        ("50 MB chunked body", "POST", "/v1/chat/completions", {}, {"content": chunked()}),
        ("70 MB import", "POST", "/api/imports/sft", bearer(op), {"content": b"z" * (70 * 2**20)}),
        ("1M-char prompt in 3 MB", "POST", "/v1/chat/completions", {},
         {"json": {"model": "tiny", "messages": [{"role": "user", "content": "ab " * 1_000_000}]}}),
        ("1M-char completion prompt", "POST", "/v1/completions", {}, {"json": {"model": "tiny", "prompt": "c" * 1_000_000}}),
        ("3 MB tokenize text", "POST", "/api/tokenize", {}, {"json": {"text": "d" * 3_000_000}}),
        ("surrogate sft demo", "POST", "/api/sft/demos", bearer(ann), {"content": ('{"messages": [{"role": "user", "content": %s}]}' % s).encode()}),
        ("surrogate python", "POST", "/api/tools/python", bearer(lea), {"content": ('{"code": %s}' % s).encode()}),
        ("surrogate search", "POST", "/api/tools/search", bearer(lea), {"content": ('{"query": %s}' % s).encode()}),
        ("surrogate document", "POST", "/api/documents", bearer(op), {"content": ('{"title": %s, "text": "t"}' % s).encode()}),
        ("surrogate ranking set", "POST", "/api/ranking-sets", bearer(op), {"content": ('{"name": %s, "model": "tiny", "prompts": ["p"]}' % s).encode()}),
        ("surrogate login", "POST", "/api/login", {}, {"content": ('{"name": %s, "password": "x"}' % s).encode()}),
        ("surrogate chat", "POST", "/v1/chat/completions", {}, {"content": ('{"model": "tiny", "messages": [{"role": "user", "content": %s}]}' % s).encode()}),
        ("invalid UTF-8", "POST", "/v1/chat/completions", {}, {"content": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}'}),
        ("truncated JSON", "POST", "/api/sft/demos", bearer(ann), {"content": b'{"messages": ['}),
        ("huge wrong-typed value", "POST", "/api/tools/search", bearer(lea), {"json": {"query": "q" * 150_000, "k": "many"}}),
        ("negative max_tokens", "POST", "/v1/chat/completions", {}, {"json": {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}}),
        ("unknown model", "POST", "/v1/chat/completions", {}, {"json": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}),
        ("bad import lines", "POST", "/api/imports/sft", bearer(op), {"content": b"not json\n" * 100_000}),
        ("python code too long", "POST", "/api/tools/python", bearer(lea), {"json": {"code": "1\n" * 1_000_000}}),
    ]
    rows, ok = [], 0
    pid = server.proc.pid
    with httpx.Client(base_url=server.base_url, timeout=300) as c:
        for name, method, path, headers, kw in cases:
            h = {"content-type": "application/json", **headers} if "content" in kw else headers
            before, t0 = cpu_s(pid), time.perf_counter()
            try:
                status = c.request(method, path, headers=h, **kw).status_code
            except httpx.HTTPError as e:  # a reset connection counts as a failure
                status = f"{type(e).__name__}"
            wall, cpu = time.perf_counter() - t0, cpu_s(pid) - before
            good = isinstance(status, int) and 400 <= status < 500
            ok += good
            rows.append({"input": name, "status": status, "server_cpu_s": round(cpu, 3), "wall_s": round(wall, 3)})
    slowest = max(rows, key=lambda r: r["server_cpu_s"])
    return {"refused_4xx": ok, "tried": len(rows), "slowest_cpu": slowest, "rows": rows}


# ---- 4 + 5. big imports, annotators, kill -9 ---------------------------------------------------------
def import_file(mb: int) -> bytes:
    row = json.dumps({"messages": [{"role": "user", "content": "Summarise: " + "lorem ipsum " * 80},
                                   {"role": "assistant", "content": "A summary. " * 60}]}) + "\n"
    return row.encode() * (mb * 2**20 // len(row))


def annotate(server, keys: list[str], stop: threading.Event, latencies: list, acked: list) -> list[threading.Thread]:
    def work(key: str, i: int):
        with httpx.Client(base_url=server.base_url, headers=bearer(key), timeout=120) as c:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"messages": [{"role": "user", "content": f"q{i}-{n}"}, {"role": "assistant", "content": f"a{i}-{n}"}],
                        "submit": True}
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/sft/demos", json=body)
                except httpx.HTTPError:
                    continue  # the server is down (kill -9): not acknowledged
                latencies.append((t0, time.perf_counter() - t0))
                if r.status_code == 200:
                    acked.append(r.json()["demo_id"])
    threads = [threading.Thread(target=work, args=(k, i), daemon=True) for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    return threads


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def import_figures(server, people: dict, mb: int, annotators: int, data: Path) -> tuple[dict, object]:
    blob = import_file(mb)
    keys = [people[f"ann{i}"][1] for i in range(annotators)]
    op = bearer(people["op"][1])
    stop, latencies, acked = threading.Event(), [], []
    threads = annotate(server, keys, stop, latencies, acked)
    time.sleep(10)  # the same annotators with no import running: the baseline
    baseline = [d for _, d in latencies]
    t0 = time.perf_counter()
    r = httpx.post(server.base_url + "/api/imports/sft", content=blob, headers=op, timeout=900)
    t1 = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    during = [d for start, d in latencies if t0 <= start <= t1]
    first = {"import_mb": round(len(blob) / 2**20, 1), "import_status": r.status_code, "import_rows": r.json().get("rows"),
             "import_s": round(t1 - t0, 1), "submits_during": len(during), "p50_ms": round(pct(during, .5) * 1000, 1),
             "p99_ms": round(pct(during, .99) * 1000, 1), "max_ms": round(max(during, default=0) * 1000, 1),
             "baseline_submits": len(baseline), "baseline_p50_ms": round(pct(baseline, .5) * 1000, 1),
             "baseline_p99_ms": round(pct(baseline, .99) * 1000, 1)}

    # kill -9 in the middle of a second import, annotators still submitting
    stop, latencies, acked2 = threading.Event(), [], []
    threads = annotate(server, keys, stop, latencies, acked2)
    holder = {}
    imp = threading.Thread(target=lambda: holder.update(r=_quiet_post(server.base_url + "/api/imports/sft", blob, op)))
    imp.start()
    time.sleep(max(3.0, first["import_s"] / 2))
    server.kill()
    stop.set()
    for t in threads:
        t.join()
    imp.join()
    server2 = start_server(data, "--model", "tiny", "--no-preload", "--no-worker")
    from sqlalchemy import func, select

    from backend.db import Database
    from backend.db.models import SFTDemo
    db = Database(f"sqlite:///{data / 'playground.db'}")
    from backend.db.models import SFTVersion
    with db.read() as s:
        ids = set(s.scalars(select(SFTDemo.id).where(SFTDemo.status == "submitted")))
        staged = s.scalar(select(func.count()).select_from(SFTDemo).where(SFTDemo.status == "importing"))
        imported = s.scalar(select(func.count()).select_from(SFTVersion).join(SFTDemo, SFTDemo.id == SFTVersion.demo_id)
                            .where(SFTDemo.status == "submitted", SFTVersion.messages.like("%Summarise: lorem%")))
    db.close()
    lost = [i for i in acked + acked2 if i not in ids]
    # all-or-nothing: the visible imported rows are exactly the first import's (the killed one shows none)
    second = {"acked_before_kill": len(acked2), "acked_total": len(acked) + len(acked2), "acked_lost": len(lost),
              "staged_rows_left": staged, "imported_rows_visible": imported,
              "half_import_visible": imported != first["import_rows"]}
    return {"during_import": first, "kill9": second}, server2


def _quiet_post(url, blob, headers):
    try:
        return httpx.post(url, content=blob, headers=headers, timeout=900).status_code
    except httpx.HTTPError as e:
        return type(e).__name__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--import-mb", type=int, default=50)
    p.add_argument("--annotators", type=int, default=4)
    p.add_argument("--parts", default="sandbox,access,bad_inputs,imports")
    args = p.parse_args()
    parts = args.parts.split(",")
    data = Path(tempfile.mkdtemp(prefix="battery-")) / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")
    people = {"lea": add_user(data, "lea", "learner"), "op": add_user(data, "op", "operator")}
    for i in range(args.annotators):
        people[f"ann{i}"] = add_user(data, f"ann{i}", "annotator")
    server = start_server(data, "--model", "tiny", "--no-preload", "--no-worker")
    figures = {}
    try:
        if "sandbox" in parts:
            figures["sandbox"] = sandbox_figures(server, people["lea"][1])
            print("sandbox", figures["sandbox"]["contained"], "/", figures["sandbox"]["tried"],
                  [r for r in figures["sandbox"]["rows"] if not r["contained"]], flush=True)
        if "access" in parts:
            figures["access"] = access_figures(server, people)
            print("access", figures["access"], flush=True)
        if "bad_inputs" in parts:
            figures["bad_inputs"] = bad_input_figures(server, people)
            print("bad inputs", figures["bad_inputs"]["refused_4xx"], "/", figures["bad_inputs"]["tried"],
                  "slowest", figures["bad_inputs"]["slowest_cpu"], flush=True)
        if "imports" in parts:
            figures["imports"], server = import_figures(server, people, args.import_mb, args.annotators, data)
            print("imports", figures["imports"], flush=True)
    finally:
        server.stop()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
