"""The labeling guidelines: Markdown, versioned in the database, seeded from backend/guidelines.md."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from backend.db import Database
from backend.db.models import Guideline
from backend.users import CurrentUser

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "guidelines.md"


def get_guidelines(db: Database) -> str:
    with db.read() as s:
        row = s.scalar(select(Guideline).order_by(Guideline.id.desc()).limit(1))
    return row.text if row else DEFAULT_PATH.read_text()


def set_guidelines(db: Database, user: CurrentUser, text: str) -> None:
    if not text or not text.strip():
        raise ValueError("guidelines text is empty")
    if len(text) > 200_000:
        raise ValueError("guidelines text is longer than 200000 characters")
    with db.session() as s:
        s.add(Guideline(text=text, user_id=user.id))
