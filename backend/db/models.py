"""ORM models: users and their sessions, guidelines, SFT demonstrations, ranking sets, snapshots.

Portable SQLAlchemy 2 types only (JSON, DateTime, Text...) so the same schema runs on SQLite and
PostgreSQL. A schema change here needs a new migration in `backend/db/migrations/versions/`.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "operator", "annotator", "learner")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    # sha256 hex of a random 32-byte key: a fast hash is enough for a key nobody can guess.
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LoginSession(Base):
    """A browser login; the cookie holds the token, the table only its sha256."""
    __tablename__ = "login_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Guideline(Base):
    """Every saved version of the guidelines; the newest row is the current text."""
    __tablename__ = "guidelines"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SFTPrompt(Base):
    """A prompt queued for demonstrations (the annotator writes the ideal reply)."""
    __tablename__ = "sft_prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    system: Mapped[str] = mapped_column(Text, default="")
    prompt: Mapped[str] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Import(Base):
    """One JSONL import (backend.labels.exchange; migration 0011). Its rows (demos, ranking sets) carry its id and
    are visible only once it is "published" (backend.labels.visibility): publishing is one UPDATE of this row,
    however many rows the import wrote. staging -> published, or staging -> dropped (its rows deleted)."""
    __tablename__ = "imports"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # sft | preferences | rankings
    name: Mapped[str] = mapped_column(String(200), default="")
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="staging", server_default="staging", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rows: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # lines imported (set on publish)


class SFTDemo(Base):
    """One annotator's demonstration. `messages` is the working copy; submitted versions live in SFTVersion."""
    __tablename__ = "sft_demos"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("sft_prompts.id"), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")  # draft | submitted | skipped
    messages: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Review of the submitted demo by an operator or a second annotator (backend.labels.review; migration 0007).
    review: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")  # | accepted | rejected
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    review_note: Mapped[str] = mapped_column(Text, default="", server_default="")
    # the import that wrote it (None: an annotator did); hidden until that import is published (migration 0011)
    import_id: Mapped[int | None] = mapped_column(ForeignKey("imports.id"), nullable=True, index=True)
    versions: Mapped[list["SFTVersion"]] = relationship(back_populates="demo", order_by="SFTVersion.version")


class SFTVersion(Base):
    """An immutable submitted version of a demonstration."""
    __tablename__ = "sft_versions"
    __table_args__ = (UniqueConstraint("demo_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    demo_id: Mapped[int] = mapped_column(ForeignKey("sft_demos.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    messages: Mapped[list] = mapped_column(JSON)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    demo: Mapped[SFTDemo] = relationship(back_populates="versions")


class RankingSet(Base):
    __tablename__ = "ranking_sets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # operators pick sets by name (migration 0006)
    model: Mapped[str] = mapped_column(String(200), default="")
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    k: Mapped[int] = mapped_column(Integer)
    annotators_per_item: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # "open" (migration 0010). Imported sets are "open" too: they are hidden while their import stages them by
    # import_id (backend.labels.visibility; migration 0011), not by status.
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    import_id: Mapped[int | None] = mapped_column(ForeignKey("imports.id"), nullable=True, index=True)
    items: Mapped[list["RankingItem"]] = relationship(back_populates="set", order_by="RankingItem.position")


class RankingItem(Base):
    __tablename__ = "ranking_items"
    # The queue walks a set's items in position order and stops at the first one that still needs the
    # caller (rankings.next_item); without this index SQLite checks every item, then sorts.
    __table_args__ = (Index("ix_ranking_items_set_id_position", "set_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("ranking_sets.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    set: Mapped[RankingSet] = relationship(back_populates="items")
    candidates: Mapped[list["Candidate"]] = relationship(back_populates="item", order_by="Candidate.position")


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("item_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("ranking_items.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order shown to annotators
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200), default="")  # model name, or "supplied"
    flags: Mapped[list] = mapped_column(JSON, default=list)  # reviewers' flags: spam, unsafe, off-topic (migration 0007)
    item: Mapped[RankingItem] = relationship(back_populates="candidates")


class Ranking(Base):
    """One annotator's ranking of one item: `order` lists candidate ids best to worst.
    Revisiting updates the row and bumps `revision`; skipped rows have an empty order."""
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("ranking_items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    order: Mapped[list] = mapped_column(JSON, default=list)
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Snapshot(Base):
    """An immutable dataset file under data_dir/snapshots/, named by the sha256 of its bytes."""
    __tablename__ = "snapshots"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))  # sft | preferences | rankings
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    rows: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A training job: queued -> running -> succeeded | failed | cancelled (backend/jobs/).

    A worker claims a queued row by compare-and-set (UPDATE ... WHERE state='queued'), then owns it
    while `worker` and `attempt` match; `heartbeat` (unix seconds) going stale means the worker died.
    """
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # pretrain | sft | reward | rlhf | grpo | dpo
    name: Mapped[str] = mapped_column(String(200), default="")  # run (and model) name
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    snapshot_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the input dataset snapshot
    parent_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)  # None: any worker may run it
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:pid of the running worker
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; > 1 means a resume
    heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    step: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the registered model
    summary: Mapped[dict] = mapped_column(JSON, default=dict)  # last loss, val_bpb, tokens/s, mfu...
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobEvent(Base):
    """What a job reported, in order: kind metric (one per step), sample, checkpoint, log (a text line)."""
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class Document(Base):
    """A document of the search tool (backend.tools.search). Its full-text index (SQLite: the FTS5 table
    documents_fts, kept in step by triggers; PostgreSQL: a GIN tsvector index) is made by migration 0003."""
    __tablename__ = "documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(500))
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200), index=True)  # "user", "python-docs", "knowledge", ...
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ArenaBattle(Base):
    """One blind side-by-side battle (backend.arena): a prompt answered by two models. The names stay hidden
    from the voter until the battle's vote exists. status: answering -> ready (both answers in) | failed."""
    __tablename__ = "arena_battles"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    answer_a: Mapped[str | None] = mapped_column(Text, nullable=True)
    answer_b: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # temperature, top_p, max_tokens, seed
    # the earlier turns of a multi-turn battle, oldest first: [{"prompt", "answer_a", "answer_b"}]; prompt and the
    # answers above are the latest turn
    turns: Mapped[list] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default="answering")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ArenaVote(Base):
    """The one vote of a battle (unique battle_id): winner a | b | tie | both_bad."""
    __tablename__ = "arena_votes"
    id: Mapped[int] = mapped_column(primary_key=True)
    battle_id: Mapped[int] = mapped_column(ForeignKey("arena_battles.id", ondelete="CASCADE"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    winner: Mapped[str] = mapped_column(String(16))
    # why the vote stays out of the leaderboard (an answer names its model: backend/arena/identity.py); None: counted
    set_aside: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelEval(Base):
    """One report card of a registered model (backend.evals; migration 0008): its rows as JSON, newest
    per model compared side by side. `model` is the registry name (models live on disk, not in a table)."""
    __tablename__ = "model_evals"
    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)  # limit, max_tokens, reward model...
    rows: Mapped[list] = mapped_column(JSON, default=list)    # [{key, label, unit, value, n, detail, samples...}]
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
