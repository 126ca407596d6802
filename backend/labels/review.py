"""Review of labels, as Open-Assistant does it: an operator or a second annotator accepts, edits (a new version,
then accepted) or rejects each submitted demonstration, and flags ranking candidates (spam, unsafe, off-topic).
Nobody reviews their own demo. Exports carry the review state (backend.labels.exchange)."""
from __future__ import annotations

from sqlalchemy import func, select

from backend.db import Database
from backend.db.models import Candidate, SFTDemo, SFTVersion, User, utcnow
from backend.labels.visibility import DEMO_VISIBLE, is_visible
from backend.labels.messages import validate_messages
from backend.users import CurrentUser

DECISIONS = ("accept", "reject")
STATES = ("pending", "accepted", "rejected")
FLAGS = ("spam", "unsafe", "off-topic")


def _latest(s, demo_id: int) -> SFTVersion | None:
    return s.scalar(select(SFTVersion).where(SFTVersion.demo_id == demo_id).order_by(SFTVersion.version.desc()).limit(1))


def _payload(s, d: SFTDemo) -> dict:
    v = _latest(s, d.id)
    author = s.scalar(select(User.name).where(User.id == d.user_id))
    return {"demo_id": d.id, "author": author, "review": d.review, "review_note": d.review_note,
            "versions": s.scalar(select(func.count()).where(SFTVersion.demo_id == d.id)),
            "messages": v.messages if v else d.messages}


def next_for_review(db: Database, user: CurrentUser) -> dict | None:
    """The oldest submitted demo still pending review that `user` did not write; None when none is left."""
    with db.read() as s:
        d = s.scalar(select(SFTDemo).where(SFTDemo.status == "submitted", SFTDemo.review == "pending",
                                           SFTDemo.user_id != user.id, DEMO_VISIBLE).order_by(SFTDemo.id).limit(1))
        return None if d is None else _payload(s, d)


def review_counts(db: Database) -> dict:
    with db.read() as s:
        rows = s.execute(select(SFTDemo.review, func.count()).where(SFTDemo.status == "submitted", DEMO_VISIBLE)
                         .group_by(SFTDemo.review)).all()
    return {state: dict(rows).get(state, 0) for state in STATES}


def review_demo(db: Database, user: CurrentUser, demo_id: int, decision: str, note: str = "",
                messages: list | None = None) -> dict:
    """Accept or reject a submitted demo; with `messages`, the reviewer's edit becomes its newest version first."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if messages is not None and decision != "accept":
        raise ValueError("an edit is accepted: give decision 'accept' with edited messages")
    clean = validate_messages(messages, complete=True) if messages is not None else None
    with db.session() as s:
        d = s.get(SFTDemo, demo_id)
        if d is None or d.status != "submitted" or not is_visible(s, d.import_id):
            raise LookupError(f"no submitted demo {demo_id}")
        if d.user_id == user.id:
            raise PermissionError("a demo is reviewed by someone other than its author")
        if clean is not None:
            last = _latest(s, d.id)
            s.add(SFTVersion(demo_id=d.id, version=(last.version if last else 0) + 1, messages=clean, user_id=user.id))
        d.review, d.reviewed_by, d.review_note, d.updated_at = (
            "accepted" if decision == "accept" else "rejected", user.id, (note or "").strip()[:2000], utcnow())
        s.flush()
        return _payload(s, d)


def flag_candidate(db: Database, user: CurrentUser, candidate_id: int, flag: str, on: bool = True) -> list[str]:
    """Set or clear one flag on a ranking candidate; returns its flags."""
    if flag not in FLAGS:
        raise ValueError(f"flag must be one of {', '.join(FLAGS)}, not {flag!r}")
    with db.session() as s:
        c = s.get(Candidate, candidate_id)
        if c is None or not is_visible(s, c.item.set.import_id):  # a set an import is staging is not there yet
            raise LookupError(f"no candidate {candidate_id}")
        flags = [f for f in (c.flags or []) if f != flag] + ([flag] if on else [])
        c.flags = sorted(flags)
        return c.flags
