"""python -m backend.bench bpe [--chars 1000000] [--vocab 4096] [--repeat 3]

Who is who:
- full training: OUR incremental Python trainer (backend.bpe.BPETrainer) vs rustbpe (nanochat's Rust trainer,
  which the app uses for full training) on the same corpus, split pattern and vocabulary; both must produce
  the same merges.
- step mode: OUR incremental trainer's time per merge vs the naive trainer that recounts every pair after each
  merge (the textbook baseline), on 1 MB of Python standard library source.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from backend import bpe
from backend.corpora import load_corpus


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m backend.bench bpe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="python-stdlib")
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pattern", default="gpt4")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each timing (median reported)")
    ap.add_argument("--step-merges", type=int, default=300, help="merges timed in step mode")
    ap.add_argument("--naive-merges", type=int, default=5, help="merges timed for the naive rescan trainer")
    args = ap.parse_args(argv)

    text = load_corpus(args.corpus, max_chars=args.chars)
    mb = len(text.encode()) / 1e6
    print(f"corpus {args.corpus}: {len(text):,} chars ({mb:.2f} MB), pattern {args.pattern}, vocab {args.vocab}")
    threads = os.environ.get("RAYON_NUM_THREADS") or str(os.cpu_count())

    # warm-up: regex compile, rustbpe import, page cache
    bpe.train_rustbpe(text[:50_000], 300, args.pattern)
    bpe.BPETrainer(text[:50_000], args.pattern).train(300)

    rust_s, ranks = _timed(lambda: bpe.train_rustbpe(text, args.vocab, args.pattern), args.repeat)
    print(f"rustbpe full training to {args.vocab}: {rust_s:.3f} s (rayon threads: {threads})")

    def ours_full():
        t = bpe.BPETrainer(text, args.pattern)
        t.train(args.vocab)
        return t

    ours_s, trainer = _timed(ours_full, max(1, args.repeat - 1))
    same = trainer.ranks() == ranks
    print(f"ours (incremental Python) full training to {args.vocab}: {ours_s:.3f} s; identical merges: {same}")

    # step mode: setup (chunking + first pair counts), then time per merge
    init_s, t = _timed(lambda: bpe.BPETrainer(text, args.pattern), 1)
    t0 = time.perf_counter()
    for _ in range(args.step_merges):
        t.step()
    per_merge_ours = (time.perf_counter() - t0) / args.step_merges
    print(f"step mode: setup {init_s:.3f} s, then {1000 * per_merge_ours:.2f} ms per merge "
          f"(mean of the first {args.step_merges})")

    chunking_s, _ = _timed(lambda: bpe.train_naive(text, 256, args.pattern), 1)  # chunking only, no merge
    naive_s, _ = _timed(lambda: bpe.train_naive(text, 256 + args.naive_merges, args.pattern), 1)
    per_merge_naive = max(naive_s - chunking_s, 1e-9) / args.naive_merges
    print(f"naive rescan trainer: {1000 * per_merge_naive:.1f} ms per merge (first {args.naive_merges}, "
          f"its one-time chunking of {chunking_s:.3f} s subtracted)")

    result = {"bench": "bpe", "device": "cpu", "threads": int(threads) if threads.isdigit() else threads,
              "corpus": args.corpus, "chars": len(text), "vocab": args.vocab, "identical_merges": same,
              "results": [
                  {"metric": f"full BPE training to {args.vocab} on {mb:.1f} MB", "unit": "s",
                   "ours": round(ours_s, 3), "ours_name": "incremental Python trainer (backend.bpe)",
                   "peer": round(rust_s, 3), "peer_name": "rustbpe 0.1.0 (used by the app for full training)",
                   "ratio": round(rust_s / ours_s, 3), "goal_ratio": None},
                  {"metric": f"step mode: time per merge on {mb:.1f} MB", "unit": "ms",
                   "ours": round(1000 * per_merge_ours, 3), "ours_name": "incremental pair counts + lazy heap",
                   "peer": round(1000 * per_merge_naive, 2), "peer_name": "naive rescan per merge",
                   "ratio": round(per_merge_naive / per_merge_ours, 1), "goal_ratio": None},
                  {"metric": f"step mode setup on {mb:.1f} MB", "unit": "s", "ours": round(init_s, 3),
                   "peer": None, "peer_name": "no peer: one-time chunking and first pair count", "ratio": None,
                   "goal_ratio": None},
              ]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
