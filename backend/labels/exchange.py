"""JSONL out and in. Shapes are the ones TRL trainers and Hugging Face `datasets` read:

    sft:          {"messages": [{"role": ..., "content": ...}, ...]}            (conversational language modeling)
    preferences:  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                   "rejected": [{"role": "assistant", ...}]}                    (conversational preference)
                  one row for every one of the K-choose-2 pairs of each ranking
    rankings:     {"prompt": str, "candidates": [str, ...], "ranking": [candidate index, best first],
                   "all_bad": bool, "annotator": str, "set_id": int, "item_id": int}

Imports take the same shapes. One bad line refuses the whole file with each bad line's number and reason.
SFT imports are read line by line and written in batches of STAGE_BATCH rows, each its own short
transaction, as hidden ("importing") demos; only when every line is good are they published with one
UPDATE. So annotators' writes wait at most one batch behind an import, never the whole file, and a
refused or interrupted import leaves nothing visible (`drop_staged` clears leftovers at start).
Ranking and preference imports are still checked whole and written in one transaction.
"""
from __future__ import annotations

import json
from itertools import combinations

import threading
from collections.abc import Iterable

from sqlalchemy import delete, func, select, update

from backend.db import Database
from backend.db.models import SFTDemo, SFTVersion
from backend.labels import rankings as rk
from backend.labels.review import STATES as REVIEW_STATES
from backend.labels.messages import flatten, validate_messages
from backend.users import CurrentUser

KINDS = ("sft", "preferences", "rankings")
MAX_ERRORS = 50


class ImportRefused(ValueError):
    def __init__(self, errors: list[tuple[int, str]]):
        self.errors = errors
        shown = "; ".join(f"line {n}: {why}" for n, why in errors[:10])
        super().__init__(f"import refused, nothing imported ({len(errors)} bad line(s)): {shown}")

    def http_detail(self) -> dict:
        return {"message": str(self), "errors": [{"line": n, "reason": r} for n, r in self.errors]}


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True)


def export_sft(db: Database, structured: bool = False) -> list[dict]:
    """The newest submitted version of every demo, oldest demo first."""
    with db.read() as s:
        demos = s.scalars(select(SFTDemo).where(SFTDemo.status == "submitted").order_by(SFTDemo.id)).all()
        rows = []
        for d in demos:
            latest = s.scalar(select(SFTVersion).where(SFTVersion.demo_id == d.id).order_by(SFTVersion.version.desc()).limit(1))
            rows.append({"messages": latest.messages if structured else flatten(latest.messages),
                         "review": d.review})  # pending | accepted | rejected (backend.labels.review)
        return rows


def export_rankings(db: Database, set_id: int | None = None) -> list[dict]:
    with db.read() as s:
        out = []
        for item, r, name in rk.rankings_for_set(s, set_id):
            cands = item.candidates
            index = {c.id: c.position for c in cands}
            out.append({"set_id": item.set_id, "item_id": item.id, "prompt": item.prompt,
                        "candidates": [c.text for c in cands], "ranking": [index[c] for c in r.order],
                        "all_bad": r.all_bad, "annotator": name,
                        "flags": [list(c.flags or []) for c in cands]})  # reviewers' flags per candidate
        return out


def preference_pairs(ranking_rows: list[dict], include_all_bad: bool = False) -> list[dict]:
    """Every K-choose-2 pair of each ranking, the better candidate as `chosen`. "All bad" rankings are
    left out by default: their order says which is less bad, not which is good."""
    out = []
    for row in ranking_rows:
        if row["all_bad"] and not include_all_bad:
            continue
        ordered = [row["candidates"][i] for i in row["ranking"]]
        for better, worse in combinations(ordered, 2):
            out.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                        "chosen": [{"role": "assistant", "content": better}],
                        "rejected": [{"role": "assistant", "content": worse}]})
    return out


def export(db: Database, kind: str, set_id: int | None = None) -> list[dict]:
    if kind == "sft":
        return export_sft(db)
    if kind == "rankings":
        return export_rankings(db, set_id)
    if kind == "preferences":
        return preference_pairs(export_rankings(db, set_id))
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


def to_jsonl(rows: list[dict]) -> str:
    return "".join(_dumps(r) + "\n" for r in rows)


# ---- imports ---------------------------------------------------------------------------------

def _parse_lines(text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    rows, errors = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            errors.append((n, "each line must be a JSON object"))
            continue
        rows.append((n, obj))
    if not rows and not errors:
        errors.append((0, "the file has no rows"))
    return rows, errors


def _turn_text(value, role: str, field: str) -> str:
    """A preference field is a string or a one-message list of `role` (TRL standard or conversational)."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) >= 1 and all(isinstance(m, dict) for m in value)
            and value[-1].get("role") == role and isinstance(value[-1].get("content"), str)):
        return value[-1]["content"]
    raise ValueError(f"{field} must be a string or a list of messages ending with a {role} message")


def _check_row(kind: str, obj: dict):
    if kind == "sft":
        if set(obj) - {"messages", "review"}:
            raise ValueError(f"unknown field(s) {', '.join(sorted(set(obj) - {'messages', 'review'}))}; an SFT row "
                             "has messages and, optionally, review")
        review = obj.get("review", "pending")
        if review not in REVIEW_STATES:
            raise ValueError(f"review must be one of {', '.join(REVIEW_STATES)}, not {review!r}")
        return validate_messages(obj.get("messages"), complete=True), review
    if kind == "preferences":
        missing = {"prompt", "chosen", "rejected"} - set(obj)
        if missing:
            raise ValueError(f"missing field(s) {', '.join(sorted(missing))}")
        prompt = _turn_text(obj["prompt"], "user", "prompt")
        chosen, rejected = _turn_text(obj["chosen"], "assistant", "chosen"), _turn_text(obj["rejected"], "assistant", "rejected")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same text")
        return prompt, [chosen, rejected], [0, 1], False
    # rankings
    missing = {"prompt", "candidates", "ranking"} - set(obj)
    if missing:
        raise ValueError(f"missing field(s) {', '.join(sorted(missing))}")
    prompt, cands, ranking = obj["prompt"], obj["candidates"], obj["ranking"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if not isinstance(cands, list) or not 2 <= len(cands) <= rk.K_MAX or not all(isinstance(c, str) for c in cands):
        raise ValueError(f"candidates must be a list of 2-{rk.K_MAX} strings")
    if not isinstance(ranking, list) or sorted(ranking) != list(range(len(cands))):
        raise ValueError(f"ranking must list each candidate index 0..{len(cands) - 1} exactly once, best first")
    return prompt, cands, ranking, bool(obj.get("all_bad", False))


STAGE_BATCH = 50  # demos per short write transaction while an SFT import is staged
STAGED = "importing"  # the status of a staged, not yet published, imported demo
_import_lock = threading.Lock()


class ImportBusy(RuntimeError):
    """Another import is being staged (one at a time: each publishes exactly its own rows)."""


def import_sft_lines(db: Database, user: CurrentUser, lines: Iterable[bytes | str]) -> dict:
    """Stream an SFT JSONL import: check each line, stage good rows in batches, publish all or nothing."""
    if not _import_lock.acquire(blocking=False):
        raise ImportBusy("another import is running; try again when it has finished")
    try:
        errors: list[tuple[int, str]] = []
        staged: list[int] = []
        batch: list = []
        rows = 0
        for n, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                errors.append((n, "not UTF-8 text"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("each line must be a JSON object")
                checked = _check_row("sft", obj)  # (messages, review state)
            except json.JSONDecodeError as e:
                errors.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
            except ValueError as e:
                errors.append((n, str(e)))
            else:
                rows += 1
                if not errors:  # after the first bad line, only check (to report), never write
                    batch.append(checked)
                    if len(batch) >= STAGE_BATCH:
                        staged += _stage(db, user, batch)
                        batch = []
            if len(errors) >= MAX_ERRORS:
                break
        if not rows and not errors:
            errors.append((0, "the file has no rows"))
        if errors:
            _drop(db, staged)
            raise ImportRefused(sorted(errors)[:MAX_ERRORS])
        staged += _stage(db, user, batch)
        with db.session() as s:  # publish: one short UPDATE makes every row visible at once
            # ids, not a list (a 50 MB file stages ~10^5 rows): one import runs at a time (_import_lock)
            # and leftovers of an interrupted one are dropped at start, so the staged rows in range are ours.
            s.execute(update(SFTDemo).where(SFTDemo.id.between(min(staged), max(staged)), SFTDemo.status == STAGED,
                                            SFTDemo.user_id == user.id).values(status="submitted"))
        return {"kind": "sft", "rows": rows}
    finally:
        _import_lock.release()


def _stage(db: Database, user: CurrentUser, batch: list) -> list[int]:
    if not batch:
        return []
    with db.session() as s:
        # The messages go into the version only: the demo row stays small, so publishing (an UPDATE that
        # rewrites every staged row) takes milliseconds, not the ~1 s it took with the messages in it too.
        demos = [SFTDemo(user_id=user.id, status=STAGED, messages=[], review=review) for _, review in batch]
        s.add_all(demos)
        s.flush()
        s.add_all([SFTVersion(demo_id=d.id, version=1, messages=m, user_id=user.id) for d, (m, _) in zip(demos, batch)])
        return [d.id for d in demos]


def _drop(db: Database, ids: list[int]) -> None:
    for i in range(0, len(ids), STAGE_BATCH):
        chunk = ids[i:i + STAGE_BATCH]
        with db.session() as s:
            s.execute(delete(SFTVersion).where(SFTVersion.demo_id.in_(chunk)))
            s.execute(delete(SFTDemo).where(SFTDemo.id.in_(chunk), SFTDemo.status == STAGED))


def drop_staged(db: Database) -> int:
    """Remove demos an interrupted import left staged (called when the server starts); returns how many."""
    with db.read() as s:
        ids = list(s.scalars(select(SFTDemo.id).where(SFTDemo.status == STAGED)))
    _drop(db, ids)
    return len(ids)


def import_jsonl(db: Database, user: CurrentUser, kind: str, text: str, name: str = "import") -> dict:
    """Validate every line, then write all of it (or nothing); SFT goes through import_sft_lines."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "sft":
        return import_sft_lines(db, user, text.splitlines())
    rows, errors = _parse_lines(text)
    checked = []
    for n, obj in rows:
        try:
            checked.append(_check_row(kind, obj))
        except ValueError as e:
            errors.append((n, str(e)))
    if errors:
        raise ImportRefused(sorted(errors)[:MAX_ERRORS])
    return _import_rankings(db, user, kind, checked, name)


def _import_rankings(db: Database, user: CurrentUser, kind: str, checked: list, name: str) -> dict:
    """Each imported ranking becomes an item of a new set (grouped by K), ranked by the importing user."""
    from backend.db.models import Candidate, Ranking, RankingItem, RankingSet
    by_k: dict[int, list] = {}
    for row in checked:
        by_k.setdefault(len(row[1]), []).append(row)
    set_ids = []
    with db.session() as s:
        for k, group in sorted(by_k.items()):
            base = f"{name} ({kind}, K={k})"
            # Set names are unique: a second import of the same shape is numbered.
            n = s.scalar(select(func.count()).select_from(RankingSet).where(RankingSet.name.startswith(base)))
            rs = RankingSet(name=base if not n else f"{base} #{n + 1}", model="imported", k=k, created_by=user.id)
            s.add(rs)
            s.flush()
            set_ids.append(rs.id)
            for pos, (prompt, cands, ranking, all_bad) in enumerate(group):
                item = RankingItem(set_id=rs.id, position=pos, prompt=prompt)
                s.add(item)
                s.flush()
                cs = [Candidate(item_id=item.id, position=j, text=c, source="imported") for j, c in enumerate(cands)]
                s.add_all(cs)
                s.flush()
                s.add(Ranking(item_id=item.id, user_id=user.id, order=[cs[i].id for i in ranking], all_bad=all_bad))
    return {"kind": kind, "rows": len(checked), "set_ids": set_ids}
