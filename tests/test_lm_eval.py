"""lm-evaluation-harness itself against our /v1 (its `local-completions` model, tokenizing through our
/tokenize) and against its `hf` backend on the same weights (the bundled model's Hugging Face directory,
loaded by transformers unchanged): the per-choice log-likelihoods agree. A local multiple-choice task
over a JSONL written here, offline. Several answers end where the model's next token is <|im_end|>:
the case where the stop token must keep its log-prob entry, or the harness drops the answer's last token."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTIONS = [("What is the capital of France?", ["Paris.", "London.", "Rome."], 0),
             ("What color is the sky on a clear day?", ["Blue.", "Green.", "Red."], 0),
             ("How many legs does a spider have?", ["Six.", "Eight.", "Ten."], 1),
             ("Which planet is known as the red planet?", ["Venus.", "Jupiter.", "Mars."], 2),
             ("What is 2 + 2?", ["4", "5", "22"], 0),
             ("What do bees make?", ["Milk.", "Honey.", "Silk."], 1)]
TASK = """task: pg_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "<|im_start|>user\\n{{{{question}}}}<|im_end|>\\n<|im_start|>assistant\\n"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    with open(d / "quiz.jsonl", "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    (d / "pg_quiz.yaml").write_text(TASK.format(path=d / "quiz.jsonl"))
    return d


def per_choice(results) -> list[list[float]]:
    docs = sorted(results["samples"]["pg_quiz"], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in d["resps"]] for d in docs]


def test_harness_loglikelihoods_through_v1_match_its_hf_backend(tmp_path, task_dir, monkeypatch):
    import lm_eval  # requirements-test.txt installs it (lm-eval[api]); imported here: it is slow to import

    from backend.config import AppConfig
    from backend.lm_eval_run import run_tasks
    from models.registry import ModelRegistry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    s = start_server(tmp_path / "data", "--no-worker")
    try:
        ours = per_choice(run_tasks(s.base_url, MODEL, ["pg_quiz"], str(task_dir), log_samples=True))
        # the rule is exercised: after some answers the model's most likely next token is the stop token
        ended = 0
        for q, choices, _ in QUESTIONS:
            for c in choices:
                r = httpx.post(s.base_url + "/v1/completions", timeout=60, json={
                    "model": MODEL, "prompt": f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{c}",
                    "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}).json()
                ended += r["choices"][0]["logprobs"]["tokens"][-1] == "<|im_end|>"
        assert ended >= 3
    finally:
        s.stop()
    hf_dir = ModelRegistry(AppConfig(data_dir=tmp_path / "data")).hf_directory(MODEL)
    theirs = per_choice(lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"}, tasks=["pg_quiz"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)), log_samples=True, batch_size=18))
    assert len(ours) == len(QUESTIONS) and all(len(a) == 3 for a in ours)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3)
