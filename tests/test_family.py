"""`python -m backend.train family`: one command trains the tool-using, thinking and pelican-RLHF members from one
parent, each a real job (its own row, events, registered model with lineage), in dependency order; running it
again skips what is registered. On a tiny byte-level model, with the "tiny" budget, through the real job queue
(SQLite) and the worker's own job runner."""
from __future__ import annotations

import pytest

from backend.db import Database
from backend.jobs import queue
from backend.jobs.kinds import JobContext, get_trainer, parse_config
from backend.train.family import MEMBERS
from models.registry import ModelRegistry
from models.tokenizers import get_encoding
from tests.test_trainers import app  # noqa: F401 (fixture: a data directory with a tiny byte-level chat model)


def test_the_family_trains_each_member_as_a_job_in_order_with_lineage_and_a_rerun_skips_them(app):
    events: list = []
    cfg = parse_config("family", {"parent_model": "tiny", "budget": "tiny", "prefix": "fam", "threads": 1}, app)
    out = get_trainer("family").run(cfg, JobContext(app, emit=events.append))
    names = [f"fam-{m}" for m in MEMBERS]
    assert out.summary["members"] == names

    db = Database(app.database_url)
    jobs = sorted(queue.list_jobs(db), key=lambda j: j["id"])
    assert [(j["kind"], j["name"], j["state"]) for j in jobs] == [
        ("sft", "fam-tools", "succeeded"), ("sft", "fam-think-sft", "succeeded"), ("grpo", "fam-think", "succeeded"),
        ("reward", "fam-pelican-rm", "succeeded"), ("sft", "fam-pelican-sft", "succeeded"),
        ("rlhf", "fam-pelican", "succeeded")]
    assert all(queue.job_events(db, j["id"], kinds=("metric",)) for j in jobs)  # each shows its own progress

    reg = ModelRegistry(app)
    lineage = {n: reg.get(n).lineage for n in names}
    assert lineage["fam-tools"]["parent_model"] == lineage["fam-think-sft"]["parent_model"] == "tiny"
    assert lineage["fam-think"]["parent_model"] == "fam-think-sft"  # GRPO starts from the distilled thinker
    assert lineage["fam-pelican"]["reward_model"] == "fam-pelican-rm"
    assert lineage["fam-pelican"]["parent_model"] == "fam-pelican-sft"  # RL from the SFT model, as InstructGPT
    assert all(lineage[n]["job_id"] == j["id"] for n, j in zip(names, jobs))
    # the thinking pair writes <think> as text its parent already writes, not as a new tag token it must learn
    assert "<think>" not in get_encoding(reg.get("fam-think").tokenizer, app.data_dir).special_tokens_set
    # ... on the problems GRPO asks, most thought at a glance, so that GRPO can favour the worked habit
    think_sft, think = (queue.get_job(db, j["id"])["config"] for j in jobs[1:3])
    assert think_sft["terse_fraction"] == 0.75 and think_sft["kinds"] == think["kinds"] == ["apples"]
    phases = [e["phase"] for e in events if "phase" in e]
    assert phases[0].startswith("member 1 of 6: tools") and phases[-1].startswith("member 6 of 6: pelican")

    again: list = []
    out = get_trainer("family").run(cfg, JobContext(app, emit=again.append))
    assert out.summary["members"] == names and len(queue.list_jobs(db)) == len(jobs)  # nothing trained twice
    assert sum("already registered; skipped" in e.get("log", "") for e in again) == 6
    db.close()


def test_the_cli_refuses_a_family_that_cannot_be_trained_before_training(app, capsys):
    from backend.train.__main__ import main
    data = ["--data-dir", str(app.data_dir)]
    for sets, says in ((["parent_model=nope"], "parent_model"), (["parent_model=tiny", "members=[think]"], "think-sft"),
                       (["parent_model=tiny", "members=[pelican-rm, pelican]"], "pelican-sft"),
                       (["parent_model=tiny", "budget=huge"], "budget"), (["parent_model=tiny", "prefix=a b"], "prefix")):
        with pytest.raises(SystemExit) as e:
            main(["family", *[a for s in sets for a in ("--set", s)], *data])
        assert says in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["family", "--set", "budget", *data])
    assert "KEY=VALUE" in str(e.value.code)


def test_the_training_form_queues_a_family_with_a_parent_and_no_step_budget(app):
    """The Training tab's form (backend.jobs.form): the family kind shows a parent picker but neither the step/time
    row nor a dataset (its budget is its own setting), and what the form sends queues a family job."""
    from backend.jobs import form
    show = form.shown("family")
    assert show["parent"] and not show["budget"] and not show["dataset"] and not show["reward_model"]
    db = Database(app.database_url)
    db.migrate()
    job = queue.create_job(db, app, None, "family",
                           form.form_config("family", {"name": "", "parent_model": "tiny"}, {"budget": "tiny"}))
    assert job["state"] == "queued" and job["config"]["parent_model"] == "tiny" and job["config"]["budget"] == "tiny"
    queue.cancel_job(db, job["id"])
    db.close()


def test_the_cli_reads_a_learning_rate_written_2e_5_as_a_number(app, tmp_path):
    """PyYAML (YAML 1.1) reads 2e-5 as the string '2e-5' and the run was refused with "lr: expected a number";
    from --set and from a --config file it now reaches the trainer as 2e-05 (the refusal is then the parent's)."""
    from backend.train.__main__ import main
    data = ["--data-dir", str(app.data_dir)]
    config = tmp_path / "sft.yaml"
    config.write_text("lr: 3E-4\nparent_model: nope\n")
    for args in (["--set", "lr=2e-5", "--set", "parent_model=nope"], ["--config", str(config)]):
        with pytest.raises(SystemExit) as e:
            main(["sft", *args, *data])
        assert "parent_model" in str(e.value.code) and "lr" not in str(e.value.code), e.value.code
    with pytest.raises(SystemExit) as e:  # 1e400 reads as inf: refused by name, before anything else
        main(["sft", "--set", "lr=1e400", "--set", "parent_model=nope", *data])
    assert "lr: expected a finite number, got inf" in str(e.value.code), e.value.code
