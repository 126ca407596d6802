"""SFT demonstrations: queued prompts, drafts, submissions (every submitted version kept), skips.

A demo belongs to the annotator who wrote it; only they edit it. Submitting appends an immutable
SFTVersion; the demo's `messages` stays the working copy for the next edit.
"""
from __future__ import annotations

from sqlalchemy import exists, func, select

from backend.db import Database
from backend.db.models import SFTDemo, SFTPrompt, SFTVersion, utcnow
from backend.labels.messages import validate_messages
from backend.labels.visibility import DEMO_VISIBLE, is_visible
from backend.users import CurrentUser


def add_prompts(db: Database, user: CurrentUser, prompts: list[str], system: str = "") -> list[int]:
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    with db.session() as s:
        rows = [SFTPrompt(system=system or "", prompt=p, created_by=user.id) for p in prompts]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def starting_messages(p: SFTPrompt) -> list[dict]:
    return ([{"role": "system", "content": p.system}] if p.system else []) + [{"role": "user", "content": p.prompt},
                                                                           {"role": "assistant", "content": ""}]


def next_prompt(db: Database, user: CurrentUser) -> dict | None:
    """The user's oldest unfinished draft, else the first queued prompt they have not touched."""
    with db.read() as s:
        draft = s.scalar(select(SFTDemo).where(SFTDemo.user_id == user.id, SFTDemo.status == "draft",
                                               SFTDemo.prompt_id.is_not(None), DEMO_VISIBLE).order_by(SFTDemo.id).limit(1))
        if draft is not None:
            return _demo_payload(draft)
        touched = exists().where(SFTDemo.prompt_id == SFTPrompt.id, SFTDemo.user_id == user.id)
        p = s.scalar(select(SFTPrompt).where(~touched).order_by(SFTPrompt.id).limit(1))
        if p is None:
            return None
        return {"demo_id": None, "prompt_id": p.id, "status": "new", "messages": starting_messages(p), "versions": 0}


def _demo_payload(d: SFTDemo) -> dict:
    # An imported demo keeps its messages only in its version (exchange._SFTStager: staging writes them once).
    messages = d.messages or (d.versions[-1].messages if d.versions else [])
    return {"demo_id": d.id, "prompt_id": d.prompt_id, "status": d.status, "messages": messages,
            "versions": len(d.versions), "updated_at": d.updated_at.isoformat()}


def save(db: Database, user: CurrentUser, messages: list, demo_id: int | None = None,
         prompt_id: int | None = None, submit: bool = False) -> dict:
    """Save a draft (submit=False) or submit a new version. Returns the demo with its version count."""
    clean = validate_messages(messages, complete=submit)
    with db.session() as s:
        if demo_id is None:
            if prompt_id is not None and s.get(SFTPrompt, prompt_id) is None:
                raise LookupError(f"no SFT prompt {prompt_id}")
            demo = SFTDemo(user_id=user.id, prompt_id=prompt_id, status="draft", messages=clean)
            s.add(demo)
            s.flush()
        else:
            demo = s.get(SFTDemo, demo_id)
            if demo is None or not is_visible(s, demo.import_id):
                raise LookupError(f"no SFT demo {demo_id}")
            if demo.user_id != user.id:
                raise PermissionError("only the annotator who wrote a demo can edit it")
            demo.messages = clean
            demo.updated_at = utcnow()
        if submit:
            n = s.scalar(select(func.count()).where(SFTVersion.demo_id == demo.id))
            s.add(SFTVersion(demo_id=demo.id, version=n + 1, messages=clean, user_id=user.id))
            demo.status = "submitted"
        elif demo.status == "skipped":
            demo.status = "draft"
        s.flush()
        s.refresh(demo)
        return _demo_payload(demo)


def skip(db: Database, user: CurrentUser, prompt_id: int) -> dict:
    with db.session() as s:
        p = s.get(SFTPrompt, prompt_id)
        if p is None:
            raise LookupError(f"no SFT prompt {prompt_id}")
        demo = s.scalar(select(SFTDemo).where(SFTDemo.prompt_id == prompt_id, SFTDemo.user_id == user.id))
        if demo is None:
            demo = SFTDemo(user_id=user.id, prompt_id=prompt_id, status="skipped", messages=starting_messages(p))
            s.add(demo)
        elif demo.status == "draft":
            demo.status = "skipped"
        s.flush()
        s.refresh(demo)
        return _demo_payload(demo)


def get(db: Database, user: CurrentUser, demo_id: int) -> dict:
    """A demo with its full version history (owner, or an operator reviewing)."""
    with db.read() as s:
        d = s.get(SFTDemo, demo_id)
        if d is None or not is_visible(s, d.import_id):
            raise LookupError(f"no SFT demo {demo_id}")
        if d.user_id != user.id and not user.can("operator"):
            raise PermissionError("this demo belongs to another annotator")
        out = _demo_payload(d)
        out["history"] = [{"version": v.version, "messages": v.messages, "created_at": v.created_at.isoformat()}
                          for v in d.versions]
        return out


def list_mine(db: Database, user: CurrentUser) -> list[dict]:
    with db.read() as s:
        demos = s.scalars(select(SFTDemo).where(SFTDemo.user_id == user.id, DEMO_VISIBLE).order_by(SFTDemo.updated_at.desc())).all()
        out = [_demo_payload(d) for d in demos]
        return [{**p, "first_user_turn": next((m["content"][:120] for m in p["messages"] if m["role"] == "user"), "")}
                for p in out]


def draft_with_model(engines, model: str, messages: list, temperature: float = 0.7, max_tokens: int = 300) -> list[dict]:
    """Fill the last (empty) assistant turn with the model's reply, remembering it as `model_draft`."""
    from backend.labels.candidates import draft_reply
    from backend.labels.messages import flatten
    clean = validate_messages(messages, complete=False)
    if clean and clean[-1]["role"] == "assistant" and not clean[-1]["content"].strip():
        clean = clean[:-1]
    if not clean or clean[-1]["role"] not in ("user", "tool"):
        raise ValueError("the conversation must end with a user turn (or an empty assistant turn) to draft a reply")
    text = draft_reply(engines, model, flatten(clean), temperature, max_tokens)
    clean.append({"role": "assistant", "content": text, "model_draft": text, "origin": "model"})
    return clean
