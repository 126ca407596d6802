"""Ranking sets: prompts x K candidates, a queue that hands each annotator the next item, submissions.

A ranking orders candidate ids best to worst. Each (item, annotator) has one row; revisiting changes
it and bumps its revision. An item is done when `annotators_per_item` people ranked it (skips don't count).
Only visible sets exist for everyone here: a set an import is still staging (backend/labels/exchange.py; the
rule is backend/labels/visibility.py) is in no list, queue, item lookup, submit, export or agreement.
"""
from __future__ import annotations

from functools import cache

from sqlalchemy import bindparam, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from backend.db import Database
from backend.db.models import Candidate, Import, Ranking, RankingItem, RankingSet, User, utcnow
from backend.labels.visibility import PUBLISHED, SET_VISIBLE, STAGING, is_visible
from backend.users import CurrentUser

K_MIN, K_MAX = 4, 9  # candidates sampled per prompt
OPEN = "open"  # RankingSet.status (every set; an imported one is hidden by its import, not its status)
MAX_PROMPT = 20_000


def create_set(db: Database, user: CurrentUser, name: str, prompts: list[str], candidates: list[list[str]],
               model: str = "", temperature: float = 1.0, annotators_per_item: int = 1,
               min_k: int = K_MIN) -> dict:
    """Store a set from prompts and their candidate texts (sampled by the caller or supplied).

    Validates everything before writing; one transaction, so a bad set leaves nothing behind.
    """
    name = _check_name(name)
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    if len(candidates) != len(prompts):
        raise ValueError(f"candidates: need one list per prompt ({len(prompts)}), got {len(candidates)}")
    if not 1 <= int(annotators_per_item) <= 100:
        raise ValueError("annotators_per_item must be 1-100")
    k = len(candidates[0])
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        if len(p) > MAX_PROMPT:
            raise ValueError(f"prompts[{i}] is longer than {MAX_PROMPT} characters")
        if len(cands) != k or not min_k <= k <= K_MAX:
            raise ValueError(f"candidates[{i}]: every prompt needs the same number of candidates, {min_k}-{K_MAX} (got {len(cands)})")
        if any(not isinstance(c, str) for c in cands):
            raise ValueError(f"candidates[{i}]: candidates must be strings")
    _check_name_free(db, name)
    try:
        return _store_set(db, user, name, prompts, candidates, model, temperature, annotators_per_item, k)
    except IntegrityError:  # another request took the name meanwhile (the unique constraint decides)
        _check_name_free(db, name)  # says who holds it
        raise ValueError(f"name: a ranking set named {name!r} already exists; pick another name") from None


def open_set(s, set_id: int) -> RankingSet:
    """The set, for readers (progress, agreement); LookupError when there is none or it is still importing."""
    rs = s.get(RankingSet, set_id)
    if rs is None or not is_visible(s, rs.import_id):
        raise LookupError(f"no ranking set {set_id}")
    return rs


def _check_name(name: str | None) -> str:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ValueError("name must be 1-200 characters")
    return name


def _check_name_free(db: Database, name: str) -> None:
    """ValueError when a set holds the name: a visible set by its id; a set of an unpublished import by that
    import (its set is not readable, and publishing it would collide with a new set of the same name)."""
    with db.read() as s:
        row = s.execute(select(RankingSet.id, RankingSet.import_id, Import.state)
                        .outerjoin(Import, Import.id == RankingSet.import_id).where(RankingSet.name == name)).first()
    if row is None:
        return
    if row.import_id is None or row.state == PUBLISHED:
        raise ValueError(f"name: a ranking set named {name!r} already exists (set {row.id}); pick another name")
    if row.state == STAGING:
        raise ValueError(f"name: {name!r} is held by import {row.import_id}, still in progress (its sets appear when "
                         f"it publishes, and the name is freed if it fails); pick another name")
    raise ValueError(f"name: {name!r} is held by import {row.import_id}, which failed and is being removed (the name "
                     f"is free once its rows are gone, at the latest when the server next starts); pick another name")


def _store_set(db, user, name, prompts, candidates, model, temperature, annotators_per_item, k) -> dict:
    with db.session() as s:
        rs = RankingSet(name=name, model=model, temperature=float(temperature), k=k,
                        annotators_per_item=int(annotators_per_item), created_by=user.id)
        s.add(rs)
        s.flush()
        for pos, (p, cands) in enumerate(zip(prompts, candidates)):
            item = RankingItem(set_id=rs.id, position=pos, prompt=p)
            s.add(item)
            s.flush()
            s.add_all(Candidate(item_id=item.id, position=j, text=c, source=model or "supplied") for j, c in enumerate(cands))
        return {"id": rs.id, "name": rs.name, "k": k, "items": len(prompts), "model": model,
                "temperature": rs.temperature, "annotators_per_item": rs.annotators_per_item}


def create_set_from_model(db: Database, engines, user: CurrentUser, name: str, prompts: list[str], model: str,
                          k: int, temperature: float, annotators_per_item: int = 1, max_tokens: int = 200) -> dict:
    from backend.labels.candidates import sample_candidates
    if not K_MIN <= int(k) <= K_MAX:
        raise ValueError(f"k must be {K_MIN}-{K_MAX}")
    if not 0.0 <= float(temperature) <= 2.0:
        raise ValueError("temperature must be 0-2")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    _check_name_free(db, _check_name(name))  # before sampling: a bad or taken name should not cost minutes first
    cands = [sample_candidates(engines, model, p, int(k), float(temperature), max_tokens) for p in prompts]
    return create_set(db, user, name, prompts, cands, model=model, temperature=temperature,
                      annotators_per_item=annotators_per_item)


def list_sets(db: Database) -> list[dict]:
    with db.read() as s:
        counts = dict(s.execute(select(RankingItem.set_id, func.count()).group_by(RankingItem.set_id)).all())
        return [{"id": r.id, "name": r.name, "model": r.model, "temperature": r.temperature, "k": r.k,
                 "annotators_per_item": r.annotators_per_item, "items": counts.get(r.id, 0),
                 "created_at": r.created_at.isoformat()}
                for r in s.scalars(select(RankingSet).where(SET_VISIBLE).order_by(RankingSet.id))]


# Tables for the hot paths below (Core, not ORM: these run on every annotator click).
I, S, C, R = RankingItem.__table__, RankingSet.__table__, Candidate.__table__, Ranking.__table__


def _item_payload(conn, item, user: CurrentUser) -> dict:
    cands = conn.execute(select(C.c.id, C.c.position, C.c.text).where(C.c.item_id == item.id).order_by(C.c.position)).all()
    mine = conn.execute(select(R.c.order, R.c.all_bad, R.c.skipped, R.c.revision)
                        .where(R.c.item_id == item.id, R.c.user_id == user.id)).first()
    return {"item_id": item.id, "set_id": item.set_id, "set_name": item.name, "position": item.position,
            "prompt": item.prompt,
            "candidates": [{"id": c.id, "position": c.position, "text": c.text} for c in cands],
            "my_ranking": None if mine is None else {"order": mine.order, "all_bad": mine.all_bad,
                                                      "skipped": mine.skipped, "revision": mine.revision}}


def _items_query():
    return (select(I.c.id, I.c.set_id, I.c.position, I.c.prompt, S.c.name, S.c.annotators_per_item)
            .join(S, S.c.id == I.c.set_id).where(SET_VISIBLE))


# Built once per shape: constructing a Core statement costs about as much as SQLite takes to run it.
@cache
def _next_item_query(one_set: bool):
    # Correlated subqueries stop at the first item that qualifies, walking the items in
    # (set_id, position) order on their index, instead of counting rankings for every item of every set.
    # One round trip: the item joined with its candidates; the user has no ranking of it yet by construction.
    mine = exists().where(R.c.item_id == I.c.id, R.c.user_id == bindparam("user_id"))
    ranked = select(func.count()).where(R.c.item_id == I.c.id, R.c.skipped.is_(False)).correlate(I).scalar_subquery()
    first = select(I.c.id).join(S, S.c.id == I.c.set_id).where(SET_VISIBLE, ~mine, ranked < S.c.annotators_per_item)
    if one_set:
        first = first.where(I.c.set_id == bindparam("set_id"))
    first = first.order_by(I.c.set_id, I.c.position).limit(1).scalar_subquery()
    return (select(I.c.id, I.c.set_id, I.c.position, I.c.prompt, S.c.name, C.c.id.label("cid"),
                   C.c.position.label("cpos"), C.c.text).join(S, S.c.id == I.c.set_id).join(C, C.c.item_id == I.c.id)
            .where(I.c.id == first).order_by(C.c.position))


def next_item(db: Database, user: CurrentUser, set_id: int | None = None) -> dict | None:
    """The first item this user has not ranked or skipped that still needs rankers; None when done."""
    with db.read_conn() as conn:
        rows = conn.execute(_next_item_query(set_id is not None), {"user_id": user.id, "set_id": set_id}).all()
    if not rows:
        return None
    it = rows[0]
    return {"item_id": it.id, "set_id": it.set_id, "set_name": it.name, "position": it.position, "prompt": it.prompt,
            "candidates": [{"id": r.cid, "position": r.cpos, "text": r.text} for r in rows], "my_ranking": None}


def get_item(db: Database, user: CurrentUser, item_id: int) -> dict:
    with db.read_conn() as conn:
        item = conn.execute(_items_query().where(I.c.id == item_id)).first()
        if item is None:
            raise LookupError(f"no ranking item {item_id}")
        return _item_payload(conn, item, user)


_CANDIDATE_IDS = (select(C.c.id).join(I, I.c.id == C.c.item_id).join(S, S.c.id == I.c.set_id)
                  .where(C.c.item_id == bindparam("item_id"), SET_VISIBLE))


@cache
def _upsert(dialect: str, sqlite_version: tuple):
    """INSERT ... ON CONFLICT (item, user) DO UPDATE ... RETURNING (SQLite >= 3.35, PostgreSQL), else None."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite" and sqlite_version >= (3, 35):
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        return None
    stmt = dialect_insert(R)
    new = stmt.excluded
    return (stmt.on_conflict_do_update(index_elements=[R.c.item_id, R.c.user_id],
                                       set_={"order": new.order, "all_bad": new.all_bad, "skipped": new.skipped,
                                             "updated_at": new.updated_at, "revision": R.c.revision + 1})
            .returning(R.c.id, R.c.revision))


def submit(db: Database, user: CurrentUser, item_id: int, order: list[int] | None = None,
           all_bad: bool = False, skipped: bool = False) -> dict:
    """Store (or revise) this user's ranking of one item. `order`: candidate ids, best first, each once."""
    order = [int(x) for x in (order or [])]
    with db.write_conn() as conn:
        ids = conn.execute(_CANDIDATE_IDS, {"item_id": item_id}).scalars().all()
        if not ids:
            raise LookupError(f"no ranking item {item_id}")
        if skipped:
            order, all_bad = [], False
        elif sorted(order) != sorted(ids):
            if not (all_bad and not order):
                raise ValueError(f"order must list each of the item's candidate ids {sorted(ids)} exactly once")
        values = {"order": order, "all_bad": bool(all_bad), "skipped": bool(skipped), "updated_at": utcnow()}
        upsert = _upsert(conn.dialect.name, getattr(conn.dialect.dbapi, "sqlite_version_info", ()))
        if upsert is not None:
            # One statement, and no unique-key race when the same person submits twice at once.
            rid, revision = conn.execute(upsert, {"item_id": item_id, "user_id": user.id, "revision": 1,
                                                  "created_at": values["updated_at"], **values}).one()
        else:
            row = conn.execute(select(R.c.id, R.c.revision).where(R.c.item_id == item_id, R.c.user_id == user.id)).first()
            if row is None:
                revision = 1
                rid = conn.execute(insert(R).values(item_id=item_id, user_id=user.id, revision=1,
                                                    created_at=values["updated_at"], **values)).inserted_primary_key[0]
            else:
                rid, revision = row.id, row.revision + 1
                conn.execute(update(R).where(R.c.id == rid).values(revision=revision, **values))
        return {"ranking_id": rid, "item_id": item_id, "revision": revision, "skipped": bool(skipped)}


def my_rankings(db: Database, user: CurrentUser, set_id: int | None = None) -> list[dict]:
    with db.read() as s:
        q = (select(Ranking, RankingItem).join(RankingItem).join(RankingSet)
             .where(Ranking.user_id == user.id, SET_VISIBLE).order_by(Ranking.updated_at.desc()))
        if set_id is not None:
            q = q.where(RankingItem.set_id == set_id)
        return [{"item_id": it.id, "set_id": it.set_id, "prompt": it.prompt[:200], "order": r.order,
                 "all_bad": r.all_bad, "skipped": r.skipped, "revision": r.revision,
                 "updated_at": r.updated_at.isoformat()} for r, it in s.execute(q)]


def rankings_for_set(s, set_id: int | None = None) -> list[tuple[RankingItem, Ranking, str]]:
    """(item, ranking, annotator name) for every non-skipped full ranking; used by agreement and exports."""
    q = (select(RankingItem, Ranking, User.name).join(Ranking, Ranking.item_id == RankingItem.id)
         .join(RankingSet, RankingSet.id == RankingItem.set_id).join(User, User.id == Ranking.user_id)
         .where(Ranking.skipped.is_(False), SET_VISIBLE)
         .order_by(RankingItem.set_id, RankingItem.position, Ranking.user_id))
    if set_id is not None:
        q = q.where(RankingItem.set_id == set_id)
    return [(it, r, name) for it, r, name in s.execute(q) if r.order]
