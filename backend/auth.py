"""Who is calling: `Authorization: Bearer KEY` (REST, scripts) or the HttpOnly session cookie (browser).

Routes declare the least role they need: `user: CurrentUser = Depends(require("annotator"))`.
The check runs on the server for every request; the UI hiding a button is never the guard.
"""
from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from backend import users
from backend.users import ROLE_RANK, CurrentUser

SESSION_COOKIE = "pg_session"


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


async def current_user(request: Request) -> CurrentUser:
    pg = request.app.state.pg
    cred = credentials(request.headers, request.cookies)
    # A caller seen in the last few seconds is answered on the event loop (users.remembered_user);
    # only the others cost a worker thread and a query.
    user = users.remembered_user(pg.db, *cred) if cred else None
    if user is None and cred:
        user = await run_in_threadpool(user_from_request, pg, request.headers, request.cookies)
    if user is None:
        raise HTTPException(401, "not logged in: send 'Authorization: Bearer KEY' or log in", headers={"WWW-Authenticate": "Bearer"})
    return user


def require(role: str):
    """A FastAPI dependency admitting `role` and every role above it."""
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}")

    async def dependency(request: Request) -> CurrentUser:
        user = await current_user(request)
        if not user.can(role):
            raise HTTPException(403, f"this needs the {role} role; {user.name} is {user.role}")
        return user

    dependency.required_role = role  # read by the test that walks every route
    return dependency
