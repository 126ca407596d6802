"""Jobs over REST on a real server (with its worker process): roles on every route, bad configs refused
with a 4xx naming the key, and a tiny pretraining job going queued -> running -> succeeded with its
model at once in /api/models and /v1/models. Also the CLI's YAML config check and the config parser."""
from __future__ import annotations

import time

import httpx
import pytest
from fastapi.routing import APIRoute

from backend.api import jobs as jobs_api
from backend.db import Database
from backend.jobs import kinds
from tests.conftest import start_server
from tests.test_labels_api import auth, make_users, required_role

JOB_ROUTES = [(m, r.path, required_role(r)) for r in jobs_api.router.routes if isinstance(r, APIRoute)
              for m in sorted(r.methods)]
TINY = {"preset": "tiny", "corpus": ["python-docs"], "max_corpus_chars": 30000, "bpe_vocab_size": 512,
        "max_steps": 12, "eval_every": 6, "eval_tokens": 1024, "sample_every": 6, "sample_tokens": 8, "threads": 1}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("jobs_api") / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [("admin", "admin"), ("op", "operator"), ("ann", "annotator"), ("lea", "learner")])
    server = start_server(data, "--no-preload", "--threads", "1")  # with the worker
    yield server, people
    server.stop()
    db.close()


def key(people, name) -> dict:
    return auth(people[name][2])


def test_every_jobs_route_names_its_role_and_only_operators_and_admins_start_or_cancel():
    roles = {(m, p): r for m, p, r in JOB_ROUTES}
    assert roles == {("POST", "/api/jobs"): "operator", ("GET", "/api/jobs"): "learner",
                     ("GET", "/api/jobs/kinds"): "learner", ("GET", "/api/jobs/{job_id}"): "learner",
                     ("POST", "/api/jobs/{job_id}/cancel"): "operator", ("POST", "/api/jobs/{job_id}/resume"): "operator"}


def test_roles_are_enforced_on_the_server(live):
    server, people = live
    url = server.base_url
    body = {"kind": "pretrain", "config": {**TINY, "max_steps": 1}}
    assert httpx.post(f"{url}/api/jobs", json=body).status_code == 401
    for who in ("ann", "lea"):
        r = httpx.post(f"{url}/api/jobs", json=body, headers=key(people, who))
        assert r.status_code == 403 and "operator" in r.json()["detail"]
    assert httpx.get(f"{url}/api/jobs").status_code == 401
    assert httpx.get(f"{url}/api/jobs", headers=key(people, "lea")).status_code == 200
    for action in ("cancel", "resume"):
        assert httpx.post(f"{url}/api/jobs/1/{action}", headers=key(people, "ann")).status_code == 403
        assert httpx.post(f"{url}/api/jobs/999/{action}", headers=key(people, "admin")).status_code == 404


@pytest.mark.parametrize("body, named", [
    ({"kind": "pretrain", "config": {**TINY, "max_stepz": 3}}, "max_stepz"),
    ({"kind": "pretrain", "config": {**TINY, "max_steps": "ten"}}, "max_steps"),
    ({"kind": "pretrain", "config": {**TINY, "corpus": [3]}}, "corpus[0]"),
    ({"kind": "pretrain", "config": {**TINY, "preset": "huge"}}, "preset"),
    ({"kind": "pretrain", "config": {**TINY, "tokenizer": "no-such-bpe"}}, "tokenizer"),
    ({"kind": "pretrain", "config": {**TINY, "corpus": ["/no/such/file.txt"]}}, "corpus"),
    ({"kind": "pretrain", "config": {**TINY, "max_steps": 0}}, "max_seconds"),
    ({"kind": "pretrain", "config": {**TINY, "name": "Bad Name!"}}, "name"),
    ({"kind": "finetune", "config": {}}, "kind"),
    ({"kind": "pretrain", "config": TINY, "snapshot": "0" * 64}, "snapshot"),
])
def test_a_bad_config_is_a_422_naming_the_key(live, body, named):
    server, people = live
    r = httpx.post(f"{server.base_url}/api/jobs", json=body, headers=key(people, "op"))
    assert r.status_code == 422, r.text
    assert named in r.text


def test_unknown_body_fields_are_refused(live):
    server, people = live
    r = httpx.post(f"{server.base_url}/api/jobs", json={"kind": "pretrain", "confg": TINY}, headers=key(people, "op"))
    assert r.status_code == 422 and "confg" in r.text


def test_a_job_runs_queued_to_succeeded_and_its_model_is_listed_at_once(live):
    server, people = live
    url, op = server.base_url, key(people, "op")
    assert httpx.get(f"{url}/healthz").json()["worker"] == "running"  # app.py started the worker process
    r = httpx.post(f"{url}/api/jobs", json={"kind": "pretrain", "config": TINY}, headers=op)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["created_by"] == "op" and job["config"]["max_steps"] == 12
    seen, deadline = {job["state"]}, time.monotonic() + 180
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/api/jobs/{job['id']}", headers=key(people, "lea")).json()
        seen.add(job["state"])
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["state"] == "succeeded", job["error"]
    assert "running" in seen or job["attempt"] == 1
    assert [m["step"] for m in job["metrics"] if "loss" in m] == list(range(1, 13))
    assert [m["step"] for m in job["metrics"] if "val_bpb" in m] == [0, 6, 12]
    assert [s["step"] for s in job["samples"]] == [0, 6, 12]
    # Incremental polling: nothing new after the last event id.
    again = httpx.get(f"{url}/api/jobs/{job['id']}", params={"after": job["last_event_id"]}, headers=op).json()
    assert again["metrics"] == [] and again["log"] == [] and not again["reset"]
    models = httpx.get(f"{url}/api/models").json()["models"]
    mine = next(m for m in models if m["name"] == job["model"])
    assert mine["lineage"]["job_id"] == job["id"] and mine["lineage"]["kind"] == "pretrain"
    assert job["model"] in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    listed = httpx.get(f"{url}/api/jobs", headers=op).json()["jobs"]
    assert listed[0]["id"] == job["id"] and listed[0]["state"] == "succeeded"
    # Finished jobs cannot be cancelled; they can be resumed (here: 3 more steps).
    assert httpx.post(f"{url}/api/jobs/{job['id']}/cancel", headers=op).status_code == 422
    r = httpx.post(f"{url}/api/jobs/{job['id']}/resume", json={"config": {"max_stepz": 15}}, headers=op)
    assert r.status_code == 422 and "max_stepz" in r.text
    r = httpx.post(f"{url}/api/jobs/{job['id']}/resume", json={"config": {"max_steps": 15}}, headers=op)
    assert r.status_code == 200 and r.json()["state"] == "queued"


def test_kinds_lists_pretrain_with_its_fields(live):
    server, people = live
    got = httpx.get(f"{server.base_url}/api/jobs/kinds", headers=key(people, "lea")).json()["kinds"]
    pretrain = next(k for k in got if k["kind"] == "pretrain")
    assert {"preset", "corpus", "tokenizer", "max_seconds"} <= {f["name"] for f in pretrain["fields"]}


def test_config_parser_checks_types_and_names_the_key():
    cfg = kinds.parse_config("pretrain", {"preset": "tiny", "max_steps": 5.0, "corpus": "python-docs", "lr": 1})
    assert cfg.max_steps == 5 and cfg.corpus == ["python-docs"] and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    for bad, named in [({"max_steps": True}, "max_steps"), ({"betas": [0.9]}, "betas"), ({"lr": "fast"}, "lr"),
                       ({"seq_len": None, "max_steps": 1, "batch_size": "8"}, "batch_size")]:
        with pytest.raises(ValueError, match=named.replace("[", r"\[")):
            kinds.parse_config("pretrain", {"preset": "tiny", "max_steps": 1, **bad})


@pytest.mark.parametrize("yaml_text, named", [("preset: tiny\nmax_steps: 3\nlearning_rate: 0.1\n", "learning_rate"),
                                              ("preset: tiny\nmax_steps: ten\n", "max_steps")])
def test_cli_yaml_config_with_a_bad_key_names_it(tmp_path, yaml_text, named):
    from backend.train.__main__ import main
    f = tmp_path / "run.yaml"
    f.write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(f), "--data-dir", str(tmp_path / "data")])
    assert named in str(e.value.code) and str(e.value.code).startswith("error: ")


def test_jobs_cli_queues_lists_and_refuses_a_bad_config_by_name(tmp_path, capsys):
    from backend.jobs.__main__ import main
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("preset: tiny\ncorpus: python-docs\nmax_steps: 5\n")
    bad.write_text("preset: tiny\nmax_steps: 5\nwarmup: 3\n")
    data = ["--data-dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as e:
        main([*data, "submit", "pretrain", "--config", str(bad)])
    assert "warmup" in str(e.value.code)
    main([*data, "submit", "pretrain", "--config", str(good)])
    main([*data, "list"])
    out = capsys.readouterr().out.splitlines()
    # each job: its line, then its progress bar (queued: nothing done yet)
    assert len(out) == 4 and all("queued" in line and "pretrain" in line for line in out[::2])
    assert all(line.strip().startswith("[....") and "0%  queued: waiting for a worker" in line for line in out[1::2])
    main([*data, "cancel", "1"])
    assert "cancelled" in capsys.readouterr().out


def test_progress_reads_phase_then_step_n_of_n_with_elapsed_eta_and_a_growing_bar(tmp_path):
    """The progress every door shows, from the events a worker stores (real SQLite, the worker's own calls)."""
    from backend.config import AppConfig
    from backend.db import Database
    from backend.jobs import queue

    app = AppConfig(data_dir=tmp_path / "data")
    app.ensure_dirs()
    db = Database(app.database_url)
    db.migrate()
    job = queue.create_job(db, app, None, "pretrain", {"preset": "tiny", "max_steps": 12, "max_seconds": 150})
    assert job["progress"]["phase"].startswith("queued") and job["progress"]["fraction"] == 0
    claimed = queue.claim_next(db, "w:1")
    p = queue.get_job(db, job["id"])["progress"]
    assert p["phase"].startswith("starting") and "elapsed of a 2:30 budget" in p["text"]
    t0 = time.time() - 4  # the third step lands now
    ok = lambda evs: queue.append_events(db, job["id"], "w:1", claimed["attempt"], evs)  # noqa: E731
    ok([{"step": 0, "phase": "reading and tokenizing the corpus…", "_time": t0}])
    assert queue.get_job(db, job["id"])["progress"]["phase"] == "reading and tokenizing the corpus…"
    ok([{"step": 0, "start": "run", "_time": t0 + 1}] + [{"step": i, "loss": 5.0 - i / 10, "_time": t0 + 1 + i}
                                                        for i in range(1, 4)])
    p = queue.get_job(db, job["id"])["progress"]
    # 3 steps took 3 s: 9 more take about 9 s, well inside the 150 s budget.
    assert p["phase"] == "step 3 of 12" and p["fraction"] == 0.25 and 5 <= p["eta_s"] <= 9.5, p
    assert "about 0:0" in p["text"] and "left" in p["text"]
    ok([{"step": 6, "loss": 4.0, "_time": t0 + 7}])
    assert queue.get_job(db, job["id"])["progress"]["fraction"] == 0.5
    queue.finish_job(db, job["id"], "w:1", claimed["attempt"], "succeeded", model="m1", step=12)
    done = queue.get_job(db, job["id"])["progress"]
    assert done["fraction"] == 1 and done["eta_s"] is None and done["text"].startswith("succeeded at step 12 of 12")
    assert [n for n in done["next"] if "m1" in n and "Generate" in n] and [n for n in done["next"] if "sft" in n]
    assert done["next_actions"] == ["generate", "sft", "export"]  # the Training tab's buttons, one per sentence
    db.close()
