"""Users: accounts with a role, argon2 passwords, hashed API keys, browser login sessions.

    python -m backend.users add NAME --role annotator   # prints a one-time password and an API key
    python -m backend.users list
    python -m backend.users disable NAME
    python -m backend.users reset NAME                  # new password and API key

There are no default accounts or passwords: the first admin is made with this CLI.
"""
from __future__ import annotations

import argparse
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import bindparam, delete, select

from backend.db import Database
from backend.db.models import ROLES, LoginSession, User, utcnow

_hasher = PasswordHasher()
SESSION_DAYS = 7
# Rank of each role: a route that needs "annotator" admits operators and admins too.
ROLE_RANK = {"learner": 0, "annotator": 1, "operator": 2, "admin": 3}


@dataclass(frozen=True)
class CurrentUser:
    id: int
    name: str
    role: str

    def can(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _current(u: User) -> CurrentUser:
    return CurrentUser(u.id, u.name, u.role)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def add_user(db: Database, name: str, role: str) -> tuple[CurrentUser, str, str]:
    """Create a user; returns (user, one-time password, API key). Both secrets are shown only now."""
    check_role(role)
    name = name.strip()
    if not name or len(name) > 64:
        raise ValueError("name must be 1-64 characters")
    password, api_key = secrets.token_urlsafe(12), "pk_" + secrets.token_urlsafe(32)
    with db.session() as s:
        if s.scalar(select(User).where(User.name == name)):
            raise ValueError(f"user {name!r} already exists")
        u = User(name=name, role=role, password_hash=_hasher.hash(password), api_key_hash=sha256(api_key))
        s.add(u)
        s.flush()
        return _current(u), password, api_key


def reset_credentials(db: Database, name: str) -> tuple[str, str]:
    password, api_key = secrets.token_urlsafe(12), "pk_" + secrets.token_urlsafe(32)
    with db.session() as s:
        u = s.scalar(select(User).where(User.name == name))
        if u is None:
            raise ValueError(f"no user named {name!r}")
        u.password_hash, u.api_key_hash = _hasher.hash(password), sha256(api_key)
        s.execute(delete(LoginSession).where(LoginSession.user_id == u.id))
    forget_remembered_users()
    return password, api_key


def set_password(db: Database, user_id: int, password: str) -> None:
    if len(password) < 8:
        raise ValueError("password must be at least 8 characters")
    with db.session() as s:
        s.get(User, user_id).password_hash = _hasher.hash(password)


def list_users(db: Database) -> list[dict]:
    with db.read() as s:
        return [{"id": u.id, "name": u.name, "role": u.role, "active": u.active,
                 "created_at": u.created_at.isoformat()} for u in s.scalars(select(User).order_by(User.id))]


def set_active(db: Database, name: str, active: bool) -> None:
    with db.session() as s:
        u = s.scalar(select(User).where(User.name == name))
        if u is None:
            raise ValueError(f"no user named {name!r}")
        u.active = active
        if not active:
            s.execute(delete(LoginSession).where(LoginSession.user_id == u.id))
    forget_remembered_users()


def authenticate_password(db: Database, name: str, password: str) -> CurrentUser | None:
    with db.read() as s:
        u = s.scalar(select(User).where(User.name == name))
        if u is None or not u.active:
            _hasher.hash(password)  # spend the same time whether or not the name exists
            return None
        try:
            _hasher.verify(u.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        return _current(u)


# Runs on every REST request: a statement built once (building one costs as much as running it).
_USER_BY_KEY = select(User.id, User.name, User.role).where(User.api_key_hash == bindparam("key_hash"),
                                                             User.active.is_(True))


def user_for_api_key(db: Database, api_key: str, remember: bool = False) -> CurrentUser | None:
    """The active user holding this key. remember=True: answer from (and fill) the short-lived cache below."""
    key_hash = sha256(api_key)
    if remember and (hit := _recall(db, "key", key_hash)):
        return hit
    with db.read_conn() as conn:
        row = conn.execute(_USER_BY_KEY, {"key_hash": key_hash}).first()
    user = CurrentUser(row.id, row.name, row.role) if row else None
    if user and remember:
        _remember(db, "key", key_hash, user, REMEMBER_SECONDS)
    return user


def start_session(db: Database, user: CurrentUser) -> str:
    token = secrets.token_urlsafe(32)
    with db.session() as s:
        s.add(LoginSession(token_hash=sha256(token), user_id=user.id,
                           expires_at=utcnow() + timedelta(days=SESSION_DAYS)))
    return token


def user_for_session(db: Database, token: str, remember: bool = False) -> CurrentUser | None:
    token_hash = sha256(token)
    if remember and (hit := _recall(db, "session", token_hash)):
        return hit
    with db.read() as s:
        row = s.execute(select(User, LoginSession.expires_at).join(LoginSession, LoginSession.user_id == User.id)
                        .where(LoginSession.token_hash == token_hash, User.active.is_(True))).first()
        if row is None:
            return None
        user, expires = row
        if expires.tzinfo is None:  # SQLite hands back naive datetimes
            expires = expires.replace(tzinfo=timezone.utc)
        left = (expires - datetime.now(timezone.utc)).total_seconds()
        if left <= 0:
            return None
        if remember:
            _remember(db, "session", token_hash, _current(user), min(left, REMEMBER_SECONDS))
        return _current(user)


def end_session(db: Database, token: str) -> None:
    with db.session() as s:
        s.execute(delete(LoginSession).where(LoginSession.token_hash == sha256(token)))
    forget_remembered_users()


# ---- who is calling, remembered briefly ------------------------------------------------------------
# Every request names its caller by API key or session cookie. Looking that up is a query (and, for an
# async route dependency, a hop to a worker thread); a remembered caller costs neither. Bounded twice:
# an entry lives REMEMBER_SECONDS, so a change made by another process (the CLI disabling a user or
# resetting a key) takes effect within that; a change made through this module (disable, reset,
# logout) forgets everything at once. Only found, active users are remembered: a new key works at once.
REMEMBER_SECONDS = 5.0
REMEMBER_MAX = 10_000
_remembered: dict[tuple[str, str, str], tuple[CurrentUser, float]] = {}


def _remember(db: Database, kind: str, secret_hash: str, user: CurrentUser, seconds: float) -> None:
    if len(_remembered) >= REMEMBER_MAX:
        _remembered.clear()
    _remembered[(db.url, kind, secret_hash)] = (user, time.monotonic() + seconds)


def _recall(db: Database, kind: str, secret_hash: str) -> CurrentUser | None:
    hit = _remembered.get((db.url, kind, secret_hash))
    return hit[0] if hit and hit[1] > time.monotonic() else None


def remembered_user(db: Database, kind: str, secret: str) -> CurrentUser | None:
    """The cached answer for this API key ("key") or session token ("session") if still fresh; no I/O."""
    return _recall(db, kind, sha256(secret))


def forget_remembered_users() -> None:
    _remembered.clear()


def main(argv: list[str] | None = None) -> None:
    from backend.config import AppConfig
    p = argparse.ArgumentParser(prog="python -m backend.users", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--database-url", default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="create a user")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=ROLES)
    sub.add_parser("list", help="list users")
    for cmd in ("disable", "enable", "reset"):
        sub.add_parser(cmd).add_argument("name")
    args = p.parse_args(argv)
    cfg = AppConfig(**{k: v for k, v in (("data_dir", args.data_dir), ("database_url", args.database_url)) if v})
    cfg.ensure_dirs()
    db = Database(cfg.database_url)
    db.migrate()
    try:
        if args.cmd == "add":
            user, password, api_key = add_user(db, args.name, args.role)
            print(f"created {user.role} {user.name!r}; shown once, store them now:")
            print(f"password: {password}")
            print(f"api key:  {api_key}")
        elif args.cmd == "list":
            for u in list_users(db):
                print(f"{u['id']:>4}  {u['name']:<24} {u['role']:<10} {'active' if u['active'] else 'disabled'}")
        elif args.cmd in ("disable", "enable"):
            set_active(db, args.name, args.cmd == "enable")
            print(f"{args.name}: {args.cmd}d")
        else:
            password, api_key = reset_credentials(db, args.name)
            print(f"password: {password}\napi key:  {api_key}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
