"""python -m backend.bench tool_sft [--steps 60] [--heldout 48] [--lora-rank 0] [--threads 2] [--data-dir DIR]

Does SFT on the bundled tool-use set teach the protocol? (issue 6)

1. Held-out questions: backend.datasets.tool_use split "heldout" (its own seed): numbers, words, search
   documents and identity phrasings that the training split never uses. Asserted here: no held-out key
   and no held-out question text occurs in the rows the trainer reads.
2. Untuned: the parent model (SmolLM2-135M-Instruct) answers each question through the real tool loop
   (backend.tool_loop.run_turn: greedy, the model writes a call, the sandboxed Python or the search
   index runs it, the output goes back, the model answers). Its system prompt is TOOLS_SYSTEM, the one
   the training rows carry, which spells out the call format, so both models get the same prompt.
3. SFT: backend.train.sft.run_sft (the function the worker runs) on the bundled train split; process CPU
   seconds and wall seconds of training are reported.
4. Tuned: the same questions through the same loop.

Scores per question: `wellformed` (tool questions: the model made a call, and every call it wrote is valid
JSON naming a known tool with its one string argument, i.e. backend.tool_loop.parse_call accepts it);
`right_tool`; `correct` (the final answer: the last number for arithmetic and counting, the exact letters
as a word for spelling, six consecutive words of the right document's text (not in the question) for
search, the assistant's name for identity). Search runs over a fresh index of the built-in documents only.

Saved under <data dir>/bench/tool_sft/: result.json, curve.jsonl (the training events), transcripts.jsonl
(every question, both models: the rendered turn, tool steps and scores). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from backend.datasets.tool_use import ASSISTANT_NAME, Example, examples, search_docs
from backend.tool_loop import ToolCallError, Tools, collect_turn, parse_call, run_turn
from models.chat_format import END_TOOL_CALL, TOOL_ARG, TOOL_CALL

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                                "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}


# -- scoring (pure functions of what the model wrote; tests/test_tool_sft.py) -----------------------
def wellformed(segments) -> bool:
    """A call was made, and every call written is one the tool loop accepts (valid JSON, a known tool, its
    argument a non-empty string). A malformed call is left as text with its tags by the loop."""
    calls = [t for k, t in segments if k == "call"]
    if not calls or any(TOOL_CALL in t or END_TOOL_CALL in t for k, t in segments if k == "text"):
        return False
    try:
        for c in calls:
            parse_call(c, list(TOOL_ARG))
    except ToolCallError:
        return False
    return True


def called_tool(segments) -> str | None:
    for k, t in segments:
        if k == "call":
            try:
                return parse_call(t, list(TOOL_ARG))[0]
            except ToolCallError:
                return None
    return None


def last_number(text: str) -> str | None:
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,817,517 -> 1817517
    words = r"\b(" + "|".join(NUMBER_WORDS) + r")\b"
    found = [(m.start(), m.group()) for m in re.finditer(r"-?\d+", text)]
    found += [(m.start(), NUMBER_WORDS[m.group().lower()]) for m in re.finditer(words, text, re.I)]
    return max(found)[1] if found else None


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(words: list[str], n: int) -> set[tuple]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def correct(ex: Example, answer: str, doc_text: str | None = None) -> bool:
    """Is the final answer right? (see the module docstring)"""
    if ex.kind in ("arithmetic", "letters", "dots"):
        return last_number(answer) == ex.expect
    if ex.kind == "spelling":
        return re.search(r"(?<![\w-])" + re.escape(ex.expect) + r"(?![\w-])", answer, re.I) is not None
    if ex.kind == "search":
        said = ngrams(_words(answer), 6) - ngrams(_words(ex.question), 6)
        return bool(said & ngrams(_words(doc_text or ""), 6))
    if ex.kind == "identity":
        return ASSISTANT_NAME.lower() in answer.lower()
    raise ValueError(f"unknown kind {ex.kind!r}")


# -- running the questions through the tool loop ----------------------------------------------------
def evaluate(engine, held: list[Example], tools: Tools, max_tokens: int, label: str, log) -> tuple[dict, list[dict]]:
    from backend.serving.sampling import SamplingParams
    docs = dict(search_docs())
    rows = []
    for i, ex in enumerate(held):
        prompt = ex.row["messages"][:-1]
        r = collect_turn(run_turn(engine, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), tools))
        segs = r.message["segments"]
        row = {"model": label, "kind": ex.kind, "question": ex.question, "expect": ex.expect,
               "tool": ex.tool, "called": called_tool(segs), "wellformed": wellformed(segs),
               "correct": correct(ex, r.message["content"], docs.get(ex.expect)),
               "answer": r.message["content"], "finish": r.finish_reason, "notes": r.notes,
               "steps": [{k: s[k] for k in ("tool", "input", "output")} for s in r.steps],
               "completion_tokens": r.completion_tokens, "segments": segs}
        rows.append(row)
        if (i + 1) % 10 == 0 or i + 1 == len(held):
            log(f"  {label}: {i + 1}/{len(held)} questions, " + summary_line(summarise(rows)))
    return summarise(rows), rows


def summarise(rows: list[dict]) -> dict:
    tool_rows = [r for r in rows if r["tool"]]
    out = {"questions": len(rows), "tool_questions": len(tool_rows),
           "wellformed_calls": round(sum(r["wellformed"] for r in tool_rows) / max(len(tool_rows), 1), 4),
           "right_tool": round(sum(r["called"] == r["tool"] for r in tool_rows) / max(len(tool_rows), 1), 4),
           "correct": round(sum(r["correct"] for r in rows) / max(len(rows), 1), 4),
           "correct_by_kind": {}}
    for k in sorted({r["kind"] for r in rows}):
        ks = [r for r in rows if r["kind"] == k]
        out["correct_by_kind"][k] = f"{sum(r['correct'] for r in ks)}/{len(ks)}"
    return out


def summary_line(s: dict) -> str:
    return (f"well-formed calls {100 * s['wellformed_calls']:.0f}% of {s['tool_questions']}, right tool "
            f"{100 * s['right_tool']:.0f}%, correct {100 * s['correct']:.0f}% of {s['questions']} "
            f"({', '.join(f'{k} {v}' for k, v in s['correct_by_kind'].items())})")


def check_disjoint(train: list[Example], train_rows: list[dict], held: list[Example]) -> int:
    """No held-out key (number pair, word, document, phrasing) and no held-out question in training."""
    keys = {e.key for e in train}
    assert [e.row for e in train] == train_rows, "the trainer's rows are not the train split"
    overlap = [e.key for e in held if e.key in keys]
    assert not overlap, f"held-out keys found in the training split: {overlap[:5]}"
    questions = {m["content"] for r in train_rows for m in r["messages"] if m["role"] == "user"}
    seen = [e.question for e in held if e.question in questions]
    assert not seen, f"held-out questions found in the training rows: {seen[:5]}"
    return len(keys)


def save_transcripts(out: Path, rows: list[dict]) -> None:
    (out / "transcripts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_engine(name: str, model, enc, tokenizer: str):
    from backend.serving.engine import Engine
    from models.registry import ModelSpec
    spec = ModelSpec(name, "trained", None, tokenizer, "chatml", model.cfg.max_seq_len)
    return Engine(spec, model.eval().requires_grad_(False), enc)


def main(argv: list[str]) -> None:
    from backend.config import AppConfig
    from backend.db import Database
    from backend.jobs.kinds import JobContext, parse_config
    from backend.tools import PythonTool, SearchIndex
    from backend.train.common import load_parent
    from backend.train.pretrain import load_checkpoint
    from backend.train.sft import bundled_rows, run_sft, sft_tokenizer
    ap = argparse.ArgumentParser(prog="python -m backend.bench tool_sft")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--train-examples", type=int, default=1200)
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=96, help="generated tokens per answer (the whole turn)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-untuned", action="store_true", help="do not evaluate the untuned model")
    ap.add_argument("--data-dir", default=None, help="app data directory (default: the app's, ./data)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    app = AppConfig(data_dir=Path(args.data_dir)) if args.data_dir else AppConfig()
    app.ensure_dirs()
    out = app.data_dir / "bench" / "tool_sft"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    def log(text: str) -> None:
        print(text, flush=True)

    cfg = parse_config("sft", {"parent_model": args.model, "name": "tool-sft-bench", "max_steps": args.steps,
                               "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                               "warmup_steps": 10, "lora_rank": args.lora_rank, "n_examples": args.train_examples,
                               "seed": args.seed, "val_fraction": 0.05, "eval_every": 50,
                               "checkpoint_every": 10 ** 6, "register": False, "protocol_check": 0}, app)
    train = examples(cfg.n_examples, seed=cfg.seed, split="train")
    held = examples(args.heldout, seed=cfg.seed + 1, split="heldout")
    n_keys = check_disjoint(train, bundled_rows(cfg), held)
    log(f"{len(train)} training conversations ({n_keys} distinct keys), {len(held)} held-out questions: "
        "no shared key or question")

    db = Database(f"sqlite:///{out / 'search.db'}")  # the built-in documents only, whatever the app's index holds
    db.migrate()
    tools = Tools(python=PythonTool(), search=SearchIndex(db))
    tools.search.ensure_builtin()
    transcripts, results = [], {}

    if not args.skip_untuned:
        parent, enc, spec = load_parent(app, args.model, torch.device("cpu"))
        t0, c0 = time.perf_counter(), cpu_seconds()
        results["untuned"], rows = evaluate(make_engine(args.model, parent, enc, spec.tokenizer), held, tools,
                                            args.max_tokens, "untuned", log)
        results["untuned"].update(eval_wall_s=round(time.perf_counter() - t0, 1), eval_cpu_s=round(cpu_seconds() - c0, 1))
        transcripts += rows
        del parent
        save_transcripts(out, transcripts)  # kept even if training is cut short

    log(f"SFT: {cfg.max_steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens, lr {cfg.lr}, "
        f"{'LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else 'full fine-tune'}, {args.threads} threads")
    events: list[dict] = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        if "loss" in ev and (ev["step"] % 25 == 0 or ev["step"] == cfg.max_steps):
            log(f"  step {ev['step']}: loss {ev['loss']:.3f}, {ev['tokens_per_s']:.0f} tok/s, {ev['elapsed']:.0f} s"
                + (f", val loss {ev['val_loss']:.3f}" if "val_loss" in ev else ""))

    t0, c0 = time.perf_counter(), cpu_seconds()
    outcome = run_sft(cfg, JobContext(app, emit=on_event))
    train_wall, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    (out / "curve.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    losses = [e["loss"] for e in events if "loss" in e and "lr" in e]
    start = next(e for e in events if "start" in e)
    log(f"trained in {train_wall:.0f} s wall, {train_cpu:.0f} CPU s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    tok_name = start["tokenizer"]
    from models.tokenizers import get_encoding
    tuned, _ = load_checkpoint(Path(outcome.checkpoint), torch.device("cpu"))
    enc = get_encoding(tok_name, app.data_dir)
    t0, c0 = time.perf_counter(), cpu_seconds()
    results["tuned"], rows = evaluate(make_engine("tool-sft-bench", tuned, enc, tok_name), held, tools,
                                      args.max_tokens, "tuned", log)
    results["tuned"].update(eval_wall_s=round(time.perf_counter() - t0, 1), eval_cpu_s=round(cpu_seconds() - c0, 1))
    transcripts += rows
    save_transcripts(out, transcripts)
    db.close()

    for label, s in results.items():
        log(f"{label:8s} " + summary_line(s))
    training = {"steps": outcome.step, "batch": f"{cfg.batch_size}x{cfg.seq_len}", "lr": cfg.lr,
                "lora_rank": cfg.lora_rank, "train_conversations": start["conversations"],
                "tokenizer": tok_name, "precision": start["precision"], "wall_s": round(train_wall, 1),
                "cpu_s": round(train_cpu, 1), "threads": args.threads, "first_loss": losses[0], "final_loss": losses[-1],
                "checkpoint": outcome.checkpoint}
    t, u = results["tuned"], results.get("untuned")
    report = {"bench": "tool_sft", "device": "cpu", "threads": args.threads, "torch": torch.__version__.split("+")[0],
              "model": args.model, "heldout_questions": len(held), "training": training, **results,
              "results": [
                  {"metric": "held-out well-formed tool calls after SFT", "unit": "fraction", "ours": t["wellformed_calls"],
                   "peer": u["wellformed_calls"] if u else None, "peer_name": "untuned model, same prompt and tool loop",
                   "ratio": None, "goal": 0.8},
                  {"metric": "held-out correct final answers after SFT", "unit": "fraction", "ours": t["correct"],
                   "peer": u["correct"] if u else None, "peer_name": "untuned model, same prompt and tool loop",
                   "ratio": round(t["correct"] / u["correct"], 3) if u and u["correct"] else None,
                   "goal": "well above the untuned model"}],
              "saved": str(out)}
    (out / "result.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
