"""Run EleutherAI's lm-evaluation-harness through our own /v1, the way people run it against vLLM:

    python -m backend.lm_eval_run --base-url http://127.0.0.1:7860 --model smollm2-135m-instruct \\
        --tasks hellaswag --limit 50            # a task the harness ships (its data set must be reachable)
        --include-path DIR                      # or tasks of your own (YAML + local JSONL), offline

The harness's `local-completions` model scores log-likelihoods with echo + logprobs over /v1/completions
and tokenizes through the server (GET /tokenizer_info, POST /tokenize: its `remote` tokenizer backend),
so nothing is downloaded for the model. The harness is an optional extra (requirements-test.txt);
without it this says how to install it. Hub data sets need the network: offline, use local tasks.
"""
from __future__ import annotations

import argparse
import json


def harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError("lm-evaluation-harness is not installed: pip install lm-eval") from e
    return lm_eval, TaskManager


def run_tasks(base_url: str, model: str, tasks: list[str], include_path: str | None = None,
              limit: int | float | None = None, max_length: int = 2048, log_samples: bool = False) -> dict:
    """The harness's results dict for `tasks` on our server at `base_url` (e.g. http://127.0.0.1:7860)."""
    lm_eval, TaskManager = harness()
    args = {"model": model, "base_url": base_url.rstrip("/") + "/v1/completions", "tokenizer_backend": "remote",
            "tokenized_requests": True, "max_length": max_length, "num_concurrent": 1, "max_retries": 1}
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks, limit=limit,
                                   task_manager=TaskManager(include_path=include_path), log_samples=log_samples,
                                   batch_size=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:7860")
    p.add_argument("--model", required=True, help="registry name of a model the server serves")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", help="a folder of your own task YAMLs")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    a = p.parse_args(argv)
    res = run_tasks(a.base_url, a.model, a.tasks.split(","), a.include_path, a.limit)
    print(json.dumps(res["results"], indent=2, default=str))


if __name__ == "__main__":
    main()
