"""Who is calling, and the one access rule every door applies (REST, /v1, Gradio handlers).

Callers name themselves by `Authorization: Bearer KEY` (REST, scripts, the openai client's api_key) or
the HttpOnly session cookie (browser). Every route and every Gradio handler declares a rule:

    "public"     anyone: reading public pages, tokenizing, login itself
    "inference"  plain generation (no tools): anyone when the server runs with open inference
                 (AppConfig.open_inference, the default), else a signed-in learner
    "learner" < "annotator" < "operator" < "admin"
                 a signed-in user with at least that role; tools (Python, search over the documents),
                 training and every write need one

FastAPI routes: `user = Depends(require("annotator"))`; Gradio handlers: `ui.login.door(pg, "learner")`.
The check runs on the server for every request; the UI hiding a button is never the guard. Wrong API
keys count as failed sign-ins (backend/throttle.py): too many from one address answer 429.
"""
from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from backend import users
from backend.throttle import Throttled
from backend.users import ROLE_RANK, CurrentUser

SESSION_COOKIE = "pg_session"
RULES = ("public", "inference", *ROLE_RANK)


class AccessDenied(Exception):
    """Why a caller may not use a door: status 401 (who are you), 403 (not your role) or 429 (throttled)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def http(self) -> HTTPException:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after:
            headers["Retry-After"] = str(self.retry_after)
        return HTTPException(self.status, self.message, headers=headers or None)


def credentials(headers, cookies) -> tuple[str, str] | None:
    """("key", API key) from the Authorization header, else ("session", token) from the cookie, else None."""
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return "key", auth[7:].strip()
    token = cookies.get(SESSION_COOKIE)
    return ("session", token) if token else None


def user_from_request(pg, headers, cookies) -> CurrentUser | None:
    """Shared by FastAPI routes and Gradio handlers (gr.Request has headers and cookies too)."""
    cred = credentials(headers, cookies)
    if cred is None:
        return None
    kind, secret = cred
    lookup = users.user_for_api_key if kind == "key" else users.user_for_session
    return lookup(pg.db, secret, remember=True)


def client_address(request) -> str:
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def needs(pg, rule: str) -> str | None:
    """The least role `rule` asks of this server, or None when anonymous callers are let in."""
    if rule == "public" or (rule == "inference" and pg.cfg.open_inference):
        return None
    return "learner" if rule == "inference" else rule


def _signed_in(pg, request, lookup) -> CurrentUser:
    """The caller's user, or AccessDenied: 401 without (valid) credentials, 429 after too many wrong keys."""
    cred = credentials(request.headers, request.cookies)
    if cred is None:
        raise AccessDenied(401, "not logged in: send 'Authorization: Bearer KEY' or log in")
    address = client_address(request)
    if cred[0] == "key":
        try:
            pg.throttle.check(key_address=address)
        except Throttled as e:
            raise AccessDenied(429, str(e), e.retry_after) from None
    user = users.remembered_user(pg.db, *cred) or lookup()
    if user is None:
        if cred[0] == "key":
            pg.throttle.failed(key_address=address)
            raise AccessDenied(401, "that API key is not valid (or its user is disabled)")
        raise AccessDenied(401, "your session has ended: log in again")
    return user


def _admit(user: CurrentUser, role: str) -> CurrentUser:
    if not user.can(role):
        raise AccessDenied(403, f"this needs the {role} role; {user.name} is {user.role}")
    return user


def check(pg, rule: str, request) -> CurrentUser | None:
    """The rule for a synchronous caller (Gradio handlers): the user, None (anonymous allowed), or AccessDenied."""
    role = needs(pg, rule)
    if role is None:
        return None
    if request is None:
        raise AccessDenied(401, "not logged in")
    return _admit(_signed_in(pg, request, lambda: user_from_request(pg, request.headers, request.cookies)), role)


async def current_user(request: Request) -> CurrentUser:
    pg = request.app.state.pg
    cred = credentials(request.headers, request.cookies)
    # A caller seen in the last few seconds (users.remembered_user), or one with no credentials at all,
    # is answered on the event loop; only the others cost a worker thread and a query.
    lookup = lambda: user_from_request(pg, request.headers, request.cookies)  # noqa: E731
    try:
        if cred is None or users.remembered_user(pg.db, *cred) is not None:
            return _signed_in(pg, request, lookup)
        return await run_in_threadpool(_signed_in, pg, request, lookup)
    except AccessDenied as e:
        raise e.http() from None


async def allow(request: Request, rule: str) -> CurrentUser | None:
    """The rule for an async door that decides late (e.g. /v1 chat asks for tools in its body)."""
    role = needs(request.app.state.pg, rule)
    if role is None:
        return None
    user = await current_user(request)
    try:
        return _admit(user, role)
    except AccessDenied as e:
        raise e.http() from None


def require(rule: str):
    """A FastAPI dependency for `rule` (see RULES): the user, or None where anonymous callers are let in."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")

    async def dependency(request: Request) -> CurrentUser | None:
        return await allow(request, rule)

    dependency.required_role = rule  # read by the test that walks every route
    return dependency

