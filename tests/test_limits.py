"""Limits before work, against a real server: oversize bodies 413 at once (by Content-Length and when
streamed), prompts bounded by characters before tokenizing, one error serialiser that survives lone
surrogates, sign-in throttling (429 + Retry-After), per-caller fairness (429), and a sandbox probe that
notices bubblewrap appearing without a restart."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from argon2 import PasswordHasher

from backend import users
from backend.db import Database
from tests.conftest import ROOT, start_server
from tests.helpers import register_tiny_model

SURROGATE = '"\\ud800"'  # a valid JSON escape that is not valid Unicode text


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("limits") / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    try:
        people = {n: users.add_user(db, n, r) for n, r in
                  [("lea", "learner"), ("lea2", "learner"), ("ann", "annotator"), ("op", "operator"), ("locked", "learner")]}
    finally:
        users._hasher = PasswordHasher()
    server = start_server(data, "--model", "tiny", "--no-preload", "--no-worker", "--max-body-bytes", "200000",
                          "--max-import-bytes", "2000000", "--max-prompt-chars", "50000")
    yield server, people
    server.stop()
    db.close()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_an_oversize_body_is_refused_413_before_it_is_read(live):
    server, people = live
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 300_000 + b'"}]}'
    r = httpx.post(server.base_url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 200,000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(40):
            yield b"x" * 10_000
    r = httpx.post(server.base_url + "/api/sft/demos", content=chunks(), headers={**bearer(people["ann"][2]),
                                                                                 "content-type": "application/json"})
    assert r.status_code == 413 and "at most 200,000 bytes" in r.json()["detail"]
    # imports have their own, larger limit: a 300 kB import is read (and refused for what it holds, not its size)
    r = httpx.post(server.base_url + "/api/imports/sft", content=b"not json\n" * 33_000, headers=bearer(people["op"][2]))
    assert r.status_code == 422 and "line 1" in r.text
    r = httpx.post(server.base_url + "/api/imports/sft", content=b"x" * 2_100_000, headers=bearer(people["op"][2]))
    assert r.status_code == 413 and "an import may be at most 2,000,000 bytes" in r.json()["detail"]


def test_a_long_prompt_is_refused_by_characters(live):
    server, _ = live
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a " * 30_000}], "max_tokens": 1}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "60,000 characters" in err["message"] and "50,000" in err["message"]
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": ["b" * 30_000] * 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("path,role,body", [
    ("/api/sft/demos", "ann", '{"messages": [{"role": "user", "content": %s}]}'),
    ("/api/tools/python", "lea", '{"code": %s}'),
    ("/api/tools/search", "lea", '{"query": %s}'),
    ("/api/documents", "op", '{"title": %s, "text": "t"}'),
    ("/api/ranking-sets", "op", '{"name": %s, "model": "tiny", "prompts": ["p"]}'),
    ("/api/login", None, '{"name": %s, "password": "x"}'),
    ("/v1/chat/completions", None, '{"model": "tiny", "messages": [{"role": "user", "content": %s}]}'),
    ("/api/tokenize", None, '{"text": %s}'),
])
def test_lone_surrogates_get_a_clear_4xx(live, path, role, body):
    server, people = live
    headers = {"content-type": "application/json", **(bearer(people[role][2]) if role else {})}
    r = httpx.post(server.base_url + path, content=(body % SURROGATE).encode(), headers=headers, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()
    message = err["error"]["message"] if "error" in err else str(err["detail"])
    assert "unicode" in message.lower() or "surrogate" in message.lower(), message


def test_a_huge_bad_value_is_reported_short(live):
    server, people = live
    r = httpx.post(server.base_url + "/api/tools/search", json={"query": "q" * 150_000, "k": "many"},
                   headers=bearer(people["lea"][2]))
    assert r.status_code == 422 and len(r.content) < 5_000


def test_wrong_passwords_are_throttled_per_account(live):
    server, people = live
    url = server.base_url + "/api/login"
    got = [httpx.post(url, json={"name": "locked", "password": "wrong"}).status_code for _ in range(5)]
    assert got == [401] * 5
    r = httpx.post(url, json={"name": "locked", "password": people["locked"][1]})  # even the right one waits now
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60 and "account" in r.json()["detail"]
    assert httpx.post(url, json={"name": "lea2", "password": people["lea2"][1]}).status_code == 200  # others unaffected


def test_wrong_api_keys_are_throttled_per_address(tmp_path):
    data = tmp_path / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    _, _, key = users.add_user(db, "lea", "learner")
    db.close()
    server = start_server(data, "--model", "tiny", "--no-preload", "--no-worker")
    try:
        with httpx.Client(base_url=server.base_url) as c:
            assert c.get("/api/me", headers=bearer(key)).status_code == 200
            got = [c.get("/api/me", headers=bearer(f"pk_guess{i}")).status_code for i in range(60)]
            assert got == [401] * 60
            r = c.get("/api/me", headers=bearer("pk_guess_more"))
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "client address" in r.json()["detail"]
            assert c.get("/api/me", headers=bearer(key)).status_code == 429  # the address waits, whatever the key
            assert c.get("/api/encodings", headers=bearer("pk_guess")).status_code == 200  # public doors stay open
    finally:
        server.stop()


def test_one_user_cannot_take_every_sandbox_slot(live, sandbox_required):
    server, people = live
    url = server.base_url + "/api/tools/python"
    slow = {"code": "import time; time.sleep(4); print('slept')"}
    first: dict = {}

    def run_slow():  # a probe below may hold lea's slot for a moment: then this one is the 429, and retries
        while (r := httpx.post(url, json=slow, headers=bearer(people["lea"][2]), timeout=60)).status_code == 429:
            pass
        first["r"] = r
    t = threading.Thread(target=run_slow)
    t.start()
    try:
        with httpx.Client(timeout=60) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the first call holds lea's sandbox slot
                r = c.post(url, json={"code": "print(1)"}, headers=bearer(people["lea"][2]))
                if r.status_code == 429:
                    break
                time.sleep(0.2)  # a probe that got the slot leaves the slow call a moment to take it (no livelock)
            assert r.status_code == 429 and "already have 1 sandbox request" in r.json()["detail"]
            assert r.headers["Retry-After"] == "1"
            other = c.post(url, json={"code": "print(2)"}, headers=bearer(people["lea2"][2]))
            assert other.status_code == 200 and other.json()["stdout"].strip() == "2"
    finally:
        t.join()
    assert first["r"].status_code == 200 and "slept" in first["r"].json()["stdout"]


def test_the_sandbox_probe_notices_bubblewrap_without_a_restart():
    """A fresh interpreter whose PATH first hides bwrap, then shows it: isolation() changes its answer."""
    script = textwrap.dedent("""
        import os, shutil
        from backend.tools import sandbox
        sandbox.REPROBE_FAILED_S = 0
        real = os.environ["PATH"]
        os.environ["PATH"] = "/nonexistent"
        before = sandbox.isolation()
        os.environ["PATH"] = real
        after = sandbox.isolation()
        print(before["bwrap"], "apt-get install bubblewrap" in before["why"], after["bwrap"], shutil.which("bwrap") is not None)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, names_fix, after, installed = out.stdout.split()
    assert before == "False" and names_fix == "True"
    assert after == installed  # True wherever bubblewrap is installed (make install), re-probed at once


def test_sandbox_tests_fail_rather_than_skip_without_isolation():
    """The sandbox_required fixture: no bwrap on PATH -> the test FAILS; with the opt-out it skips."""
    target = ROOT / "tests" / f"test_zz_probe_{os.getpid()}.py"  # inside tests/, so conftest.py applies
    target.write_text("def test_it(sandbox_required):\n    pass\n")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no bwrap on this PATH
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target)]
    try:
        failed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        skipped = subprocess.run(cmd, cwd=ROOT, env={**env, "PLAYGROUND_ALLOW_NO_SANDBOX": "1"}, capture_output=True,
                                 text=True, timeout=300)
    finally:
        target.unlink()
    assert failed.returncode == 1 and "make install" in failed.stdout, failed.stdout[-2000:]  # an error: not a pass, not a skip
    assert "skipped" not in failed.stdout
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
