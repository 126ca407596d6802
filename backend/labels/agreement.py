"""How much annotators agree: Kendall's tau between rankings, consensus by Borda count or ranked pairs.

Rankings are lists of candidate ids, best first, each a permutation of the same ids.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import combinations

from backend.db import Database


def kendall_tau(a: list, b: list) -> float:
    """(concordant - discordant) / pairs over the items both rank; 1 = same order, -1 = reversed."""
    common = [x for x in a if x in set(b)]
    if len(common) < 2:
        return 1.0
    ra = {x: i for i, x in enumerate(a)}
    rb = {x: i for i, x in enumerate(b)}
    score = sum(1 if (ra[x] - ra[y]) * (rb[x] - rb[y]) > 0 else -1 for x, y in combinations(common, 2))
    return score / (len(common) * (len(common) - 1) / 2)


def borda(rankings: list[list]) -> list:
    """Each ranking gives K-1 points to its first, 0 to its last; ties go to the smaller id (shown first)."""
    points: dict = defaultdict(float)
    for r in rankings:
        for i, x in enumerate(r):
            points[x] += len(r) - 1 - i
    return sorted(points, key=lambda x: (-points[x], x))


def ranked_pairs(rankings: list[list]) -> list:
    """Tideman's ranked pairs: lock pairwise majorities, strongest first, skipping any that makes a cycle."""
    ids = sorted({x for r in rankings for x in r})
    wins: dict = defaultdict(int)
    for r in rankings:
        pos = {x: i for i, x in enumerate(r)}
        for x, y in combinations(ids, 2):
            if x in pos and y in pos:
                wins[(x, y) if pos[x] < pos[y] else (y, x)] += 1
    majorities = [(wins[(x, y)] - wins[(y, x)], x, y) for x in ids for y in ids
                  if x != y and wins[(x, y)] > wins[(y, x)]]
    majorities.sort(key=lambda m: (-m[0], m[1], m[2]))
    beats: dict = defaultdict(set)

    def reaches(src, dst) -> bool:
        stack, seen = [src], set()
        while stack:
            n = stack.pop()
            if n == dst:
                return True
            if n not in seen:
                seen.add(n)
                stack.extend(beats[n])
        return False

    for _, x, y in majorities:
        if not reaches(y, x):
            beats[x].add(y)
    # Order: repeatedly take the candidates nobody remaining beats (smallest id first on ties).
    order, left = [], set(ids)
    while left:
        top = min(x for x in left if not any(x in beats[y] for y in left))
        order.append(top)
        left.remove(top)
    return order


CONSENSUS = {"borda": borda, "ranked_pairs": ranked_pairs}


def set_agreement(db: Database, set_id: int, method: str = "borda") -> dict:
    """Per item: consensus and mean pairwise tau; per annotator: mean tau against the others' consensus."""
    from backend.labels.rankings import open_set, rankings_for_set
    if method not in CONSENSUS:
        raise ValueError(f"method must be one of {', '.join(CONSENSUS)}")
    consensus_of = CONSENSUS[method]
    with db.read() as s:
        open_set(s, set_id)
        rows = rankings_for_set(s, set_id)
        by_item: dict = defaultdict(list)
        prompts = {}
        for item, r, name in rows:
            by_item[item.id].append((name, list(r.order)))
            prompts[item.id] = item.prompt
    items, per_annotator = [], defaultdict(list)
    for item_id, ranked in by_item.items():
        orders = [o for _, o in ranked]
        taus = [kendall_tau(a, b) for a, b in combinations(orders, 2)]
        items.append({"item_id": item_id, "prompt": prompts[item_id][:200], "annotators": len(ranked),
                      "consensus": consensus_of(orders),
                      "mean_pairwise_tau": round(sum(taus) / len(taus), 4) if taus else None})
        for i, (name, order) in enumerate(ranked):
            others = orders[:i] + orders[i + 1:]
            if others:  # leave-one-out, so an annotator is not compared with themselves
                per_annotator[name].append(kendall_tau(order, consensus_of(others)))
    item_taus = [it["mean_pairwise_tau"] for it in items if it["mean_pairwise_tau"] is not None]
    return {"set_id": set_id, "method": method, "items": items,
            "mean_pairwise_tau": round(sum(item_taus) / len(item_taus), 4) if item_taus else None,
            "annotators": {n: {"items": len(t), "tau_vs_consensus": round(sum(t) / len(t), 4)}
                           for n, t in sorted(per_annotator.items())}}
