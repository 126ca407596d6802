"""JSONL out and in. Shapes are the ones TRL trainers and Hugging Face `datasets` read:

    sft:          {"messages": [{"role": ..., "content": ...}, ...]}            (conversational language modeling)
    preferences:  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                   "rejected": [{"role": "assistant", ...}]}                    (conversational preference)
                  one row for every one of the K-choose-2 pairs of each ranking
    rankings:     {"prompt": str, "candidates": [str, ...], "ranking": [candidate index, best first],
                   "all_bad": bool, "annotator": str, "set_id": int, "item_id": int}

Imports take the same shapes. One bad line refuses the whole file with each bad line's number and reason.
Every kind is read line by line and written in batches of STAGE_BATCH rows, each its own short
transaction, hidden: SFT rows as submitted demos, rankings and preferences as items of new ranking sets
(one per K), every one carrying the id of the import's row in `imports`, which stays "staging" meanwhile
(backend/labels/visibility.py hides such rows from every reader). Only when every line is good is the
import published: one UPDATE of its `imports` row, whatever the file's size. So annotators' writes wait at
most one batch behind an import, never the whole file, and a refused or interrupted import leaves nothing
visible (its rows are deleted in batches; `drop_staged` clears a killed one's leftovers at start).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator
from itertools import combinations

from sqlalchemy import delete, func, select, update

from backend.db import Database
from backend.db.models import Candidate, Import, Ranking, RankingItem, RankingSet, SFTDemo, SFTVersion
from backend.labels import rankings as rk
from backend.labels import visibility as vis
from backend.labels.review import STATES as REVIEW_STATES
from backend.labels.messages import flatten, validate_messages
from backend.users import CurrentUser

log = logging.getLogger(__name__)
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
        demos = s.scalars(select(SFTDemo).where(SFTDemo.status == "submitted", vis.DEMO_VISIBLE).order_by(SFTDemo.id)).all()
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

def _read_rows(kind: str, lines: Iterable[bytes | str], errors: list[tuple[int, str]]) -> Iterator[tuple]:
    """Check a JSONL file line by line: yield each good row's checked form (_check_row), and append
    (line number, reason) to `errors` for each bad one; stops after MAX_ERRORS bad lines."""
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
            checked = _check_row(kind, obj)
        except json.JSONDecodeError as e:
            errors.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
        except ValueError as e:
            errors.append((n, str(e)))
        else:
            yield checked
        if len(errors) >= MAX_ERRORS:
            return


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


STAGE_BATCH = 50  # rows per short write transaction while an import is staged (and per delete when one is dropped)
_import_lock = threading.Lock()


class ImportBusy(RuntimeError):
    """Another import is being staged (one at a time: two would double the write load annotators wait behind,
    and race for the numbered names of their ranking sets)."""


def import_lines(db: Database, user: CurrentUser, kind: str, lines: Iterable[bytes | str], name: str = "import") -> dict:
    """Stream a JSONL import of any kind: check each line, stage good rows hidden in batches, publish all or nothing.

    A refused or failed import drops what it staged; a killed one leaves it hidden until `drop_staged`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not _import_lock.acquire(blocking=False):
        raise ImportBusy("another import is running; try again when it has finished")
    stager = _SFTStager(db, user, kind, name) if kind == "sft" else _RankingStager(db, user, kind, name)
    try:
        errors: list[tuple[int, str]] = []
        rows = 0
        for row in _read_rows(kind, lines, errors):
            rows += 1
            if not errors:  # after the first bad line, only check (to report), never write
                stager.add(row)
        if not rows and not errors:
            errors.append((0, "the file has no rows"))
        if errors:
            raise ImportRefused(sorted(errors)[:MAX_ERRORS])
        stager.flush()
        return {"kind": kind, "rows": rows, **stager.publish(rows)}
    except BaseException:  # refused, or the reader failed (a client gone, a disk error): leave nothing behind
        try:
            stager.drop()
        except Exception:  # the next start's drop_staged removes the rest
            log.exception("could not drop a failed import's staged rows")
        raise
    finally:
        _import_lock.release()


def import_jsonl(db: Database, user: CurrentUser, kind: str, text: str, name: str = "import") -> dict:
    """import_lines over a string (tests, small files)."""
    return import_lines(db, user, kind, text.splitlines(), name)


class _Stager:
    """Writes checked rows hidden, STAGE_BATCH at a time, each batch its own short transaction (so annotators'
    writes wait at most one batch). Every row carries the id of this import's `imports` row, made with the first
    batch, and stays hidden (backend.labels.visibility) until `publish` flips that one row to "published"."""

    def __init__(self, db: Database, user: CurrentUser, kind: str, name: str):
        self.db, self.user, self.kind, self.name, self.batch = db, user, kind, name, []
        self.import_id: int | None = None

    def add(self, row) -> None:
        self.batch.append(row)
        if len(self.batch) >= STAGE_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            with self.db.session() as s:
                if self.import_id is None:
                    imp = Import(kind=self.kind, name=self.name[:200], user_id=self.user.id, state=vis.STAGING)
                    s.add(imp)
                    s.flush()
                    self.import_id = imp.id
                self.write(s, self.batch)
            self.batch = []

    def write(self, s, batch: list) -> None:
        """Stage one batch inside transaction `s`, every row with import_id=self.import_id."""
        raise NotImplementedError

    def publish(self, rows: int) -> dict:
        """Make every staged row visible at once: one UPDATE of one row, however big the import."""
        with self.db.session() as s:
            done = s.execute(update(Import).where(Import.id == self.import_id, Import.state == vis.STAGING)
                             .values(state=vis.PUBLISHED, rows=rows)).rowcount
        if done != 1:  # dropped meanwhile (a server starting on the same database ran drop_staged)
            raise RuntimeError(f"import {self.import_id} was dropped before it could be published; import the file again")
        return self.answer()

    def answer(self) -> dict:
        """What the import's answer adds."""
        return {}

    def drop(self) -> None:
        """Hide what was staged for good, then delete it in short transactions (rows not yet flushed were never
        written)."""
        if self.import_id is not None:
            drop_import(self.db, self.import_id)


class _SFTStager(_Stager):
    """Each row (messages, review state) becomes a submitted demo and its first version."""

    def write(self, s, batch):
        # The messages go into the version only (the demo's working copy stays empty: sft._demo_payload reads the
        # version), so each row's text is written once.
        demos = [SFTDemo(user_id=self.user.id, status="submitted", messages=[], review=review, import_id=self.import_id)
                 for _, review in batch]
        s.add_all(demos)
        s.flush()
        s.add_all([SFTVersion(demo_id=d.id, version=1, messages=m, user_id=self.user.id) for d, (m, _) in zip(demos, batch)])


class _RankingStager(_Stager):
    """Each row (prompt, candidates, ranking, all_bad) becomes an item of a new set per K, ranked by the
    importing user."""

    def __init__(self, db, user, kind: str, name: str):
        super().__init__(db, user, kind, name)
        self.sets: dict[int, list[int]] = {}  # K -> [set id, next position]

    def _set_for(self, s, k: int) -> list[int]:
        if k not in self.sets:
            base = f"{self.name} ({self.kind}, K={k})"
            # Set names are unique: a second import of the same shape is numbered.
            n = s.scalar(select(func.count()).select_from(RankingSet).where(RankingSet.name.startswith(base)))
            rs = RankingSet(name=base if not n else f"{base} #{n + 1}", model="imported", k=k,
                            created_by=self.user.id, status=rk.OPEN, import_id=self.import_id)
            s.add(rs)
            s.flush()
            self.sets[k] = [rs.id, 0]
        return self.sets[k]

    def write(self, s, batch):
        items = []
        for prompt, cands, _, _ in batch:
            slot = self._set_for(s, len(cands))
            items.append(RankingItem(set_id=slot[0], position=slot[1], prompt=prompt))
            slot[1] += 1
        s.add_all(items)
        s.flush()
        cands = [[Candidate(item_id=it.id, position=j, text=c, source="imported") for j, c in enumerate(row[1])]
                 for it, row in zip(items, batch)]
        s.add_all([c for cs in cands for c in cs])
        s.flush()
        s.add_all([Ranking(item_id=it.id, user_id=self.user.id, order=[cs[i].id for i in ranking], all_bad=all_bad)
                   for it, cs, (_, _, ranking, all_bad) in zip(items, cands, batch)])

    def answer(self):
        return {"set_ids": sorted(set_id for set_id, _ in self.sets.values())}


def drop_import(db: Database, import_id: int) -> bool:
    """Mark an unpublished import "dropped" (its rows stay hidden for good), then delete its rows STAGE_BATCH at a
    time, each batch its own short transaction (one big cascading DELETE would hold the write lock as long as
    the import took to stage). False, and nothing deleted, when the import is published: never delete what
    annotators can see. Safe to repeat: a drop interrupted midway is finished by the next one."""
    with db.session() as s:
        state = s.scalar(select(Import.state).where(Import.id == import_id))
        if state is None or state == vis.PUBLISHED:
            return False
        if state != vis.DROPPED:
            s.execute(update(Import).where(Import.id == import_id).values(state=vis.DROPPED))
    while True:
        with db.session() as s:
            chunk = list(s.scalars(select(SFTDemo.id).where(SFTDemo.import_id == import_id).limit(STAGE_BATCH)))
            if not chunk:
                break
            s.execute(delete(SFTVersion).where(SFTVersion.demo_id.in_(chunk)))
            s.execute(delete(SFTDemo).where(SFTDemo.id.in_(chunk)))
    with db.read() as s:
        sets = list(s.scalars(select(RankingSet.id).where(RankingSet.import_id == import_id)))
    for set_id in sets:
        while True:
            with db.session() as s:
                chunk = list(s.scalars(select(RankingItem.id).where(RankingItem.set_id == set_id).limit(STAGE_BATCH)))
                if not chunk:
                    s.execute(delete(RankingSet).where(RankingSet.id == set_id, RankingSet.import_id == import_id))
                    break
                s.execute(delete(Ranking).where(Ranking.item_id.in_(chunk)))
                s.execute(delete(Candidate).where(Candidate.item_id.in_(chunk)))
                s.execute(delete(RankingItem).where(RankingItem.id.in_(chunk)))
    return True


def drop_staged(db: Database) -> int:
    """Remove what interrupted imports left (called when the server starts): imports still "staging" (the process
    was killed before it published) and "dropped" ones whose deleting was cut short. Returns how many imports it
    cleared."""
    with db.read() as s:
        ids = set(s.scalars(select(Import.id).where(Import.state == vis.STAGING)))
        for table in (SFTDemo, RankingSet):
            ids |= set(s.scalars(select(table.import_id).distinct().join(Import, Import.id == table.import_id)
                                 .where(Import.state == vis.DROPPED)))
    for import_id in sorted(ids):
        drop_import(db, import_id)
    return len(ids)
