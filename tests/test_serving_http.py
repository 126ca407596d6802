"""Serving many users at once, over HTTP with the official `openai` client against a real server:
streams interleave, the queue limit answers 503 with Retry-After, readiness flips after the load, and on
the bundled model a seeded request gives the same tokens alone and among eight (one of them hung up)."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.conftest import start_server
from tests.scripted import register_rambler

MSG = [{"role": "user", "content": "sing"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("serving") / "data"
    register_rambler(data, "rambler", layers=16)
    # one test plays every client from one address: lift the per-caller limit (backend/fairness.py)
    s = start_server(data, "--model", "rambler", "--no-worker", "--max-batch", "4", "--max-queued", "2",
                     "--max-requests-per-user", "100")
    yield s
    s.stop()


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def serving(server) -> dict:
    return httpx.get(server.base_url + "/readyz", timeout=5).json()["serving"]["rambler"]


def wait_for(cond, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_concurrent_streams_interleave(server):
    client = client_for(server)
    times: list[list[float]] = [[] for _ in range(3)]
    texts = [""] * 3
    start = threading.Barrier(3)

    def run(i):
        start.wait()
        for chunk in client.chat.completions.create(model="rambler", messages=MSG, max_tokens=40, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                times[i].append(time.monotonic())
                texts[i] += chunk.choices[0].delta.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(t == "la " * 40 for t in texts), texts
    # Overlapped in time: every stream had its first token before any stream had its last.
    assert max(ts[0] for ts in times) < min(ts[-1] for ts in times)


def test_a_full_queue_answers_503_with_retry_after(server):
    body = {"model": "rambler", "messages": MSG, "max_tokens": 3000, "stream": True}
    streams = []
    try:
        for _ in range(4):  # fill the batch (--max-batch 4)
            s = httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60)
            lines = s.__enter__().iter_lines()
            next(lines)
            streams.append((s, lines))  # a dropped line iterator would close its connection
        assert wait_for(lambda: serving(server)["rows"] == 4)
        for _ in range(2):  # two wait (--max-queued 2)
            s = httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60)
            streams.append((s, None))
            threading.Thread(target=s.__enter__, daemon=True).start()
        assert wait_for(lambda: serving(server)["waiting"] == 2)
        r = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert "busy" in r.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError):
            client_for(server).chat.completions.create(model="rambler", messages=MSG, max_tokens=2)
    finally:
        for s, _ in streams:
            try:
                s.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - a waiting one may not have started
                pass
    # The hung-up clients' rows leave the batch, and the server serves again.
    assert wait_for(lambda: serving(server)["rows"] == 0 and serving(server)["waiting"] == 0)
    r = client_for(server).chat.completions.create(model="rambler", messages=MSG, max_tokens=2)
    assert r.choices[0].message.content == "la la "


def test_readiness_says_loading_then_ready_and_names_a_failed_model(tmp_path):
    data = tmp_path / "data"
    register_rambler(data, "rambler", layers=2)
    s = start_server(data, "--model", "rambler", "--no-worker")
    try:
        ready = httpx.get(s.base_url + "/readyz").json()
        assert ready["ready"] and ready["state"] == "ready" and "rambler" in ready["serving"]
        assert httpx.get(s.base_url + "/healthz").json()["model_state"] == "ready"
    finally:
        s.stop()
    s = start_server(data, "--model", "no-such-model", "--no-worker")
    try:
        r = httpx.get(s.base_url + "/readyz")
        assert r.status_code == 503 and r.json()["state"] == "failed" and "no-such-model" in r.json()["message"]
        assert httpx.get(s.base_url + "/healthz").status_code == 200  # alive, not ready
    finally:
        s.stop()


@pytest.mark.slow
def test_bundled_model_gives_a_request_the_same_tokens_alone_and_among_eight(tmp_path):
    """SmolLM2 on our 4-bit kernel: bitwise batch-invariant, so a seeded sampled answer is the same alone
    and in a batch of eight, one of whose clients hangs up halfway."""
    s = start_server(tmp_path / "data", "--no-worker")
    try:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        questions = ["Tell me a joke about pelicans.", "What is a token?", "Name three colors.", "Say hello.",
                     "Why is the sky blue?", "Count to five.", "What is 2+2?"]

        def ask(i):
            r = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=24, temperature=0.8,
                                               seed=1000 + i, messages=[{"role": "user", "content": questions[i]}])
            return r.choices[0].message.content

        solo = [ask(i) for i in range(len(questions))]
        together = [None] * len(questions)
        start = threading.Barrier(len(questions) + 1)

        def run(i):
            start.wait()
            together[i] = ask(i)

        def hang_up():
            start.wait()
            body = {"model": "smollm2-135m-instruct", "max_tokens": 200, "stream": True,
                    "messages": [{"role": "user", "content": "Write a long story."}]}
            with httpx.stream("POST", s.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                for _ in range(5):
                    next(lines)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
        threads.append(threading.Thread(target=hang_up))
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert together == solo
    finally:
        s.stop()


def test_a_bad_prefill_weights_value_is_refused_with_a_clear_message(tmp_path):
    """app.py --prefill-weights takes auto, bf16 or q4; anything else stops it before it serves, naming the flag."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path / "data"), "--no-worker",
                           "--prefill-weights", "int8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.splitlines()[-1]
    assert "--prefill-weights: invalid choice: 'int8'" in err and all(w in err for w in ("auto", "bf16", "q4")), err


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["q4", "bf16"])
def test_the_app_answers_with_either_prefill_weights(tmp_path, weights):
    """The bundled model served with --prefill-weights q4 (its 4-bit blocks) or bf16 (bf16 copies): both answer
    a chat request with a ~300-token prompt, and /readyz names what the model prefills on (the 4-bit choices
    apply where it decodes on its GGUF blocks: torch's CPU int4 kernel or ours; elsewhere "float")."""
    import torch

    from backend.serving.decode_step import gguf_supported
    s = start_server(tmp_path / "data", "--no-worker", "--prefill-weights", weights)
    try:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        notes = " ".join(f"Note {i}: the pelican counted the boats." for i in range(30))
        r = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": notes + " How many notes?"}])
        assert r.usage.prompt_tokens >= 250 and r.choices[0].message.content
        serving = httpx.get(s.base_url + "/readyz", timeout=5).json()["serving"]["smollm2-135m-instruct"]
        assert serving["prefill_weights"] == (weights if gguf_supported(torch.device("cpu")) else "float")
    finally:
        s.stop()


@pytest.mark.slow
def test_serve_bench_runs_at_toy_size(capsys):
    """`python -m backend.bench serve` keeps working against the real app (its own process): every level
    measured, the scaling row computed, and a peer not given reported missing rather than invented."""
    import json

    from backend.bench import serve
    serve.main(["--clients", "1,2", "--tokens", "4", "--repeat", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("round ") for line in lines) == 4  # 2 rounds x 2 levels, one server
    by_metric = {r["metric"]: r for r in json.loads(lines[-1])["results"]}
    assert by_metric["1 clients: aggregate decode"]["ours"] > 0 and by_metric["2 clients: aggregate decode"]["ours"] > 0
    assert by_metric["2 clients vs 1 client (scaling)"]["ours"] > 0
    assert by_metric["1 clients: aggregate decode"]["peer"] is None
    assert "not measured" in by_metric["1 clients: aggregate decode"]["peer_name"]
