"""Who is calling: `Authorization: Bearer KEY` (REST, scripts) or the HttpOnly session cookie (browser).

Routes declare the least role they need: `user: CurrentUser = Depends(require("annotator"))`.
The check runs on the server for every request; the UI hiding a button is never the guard.
"""
from __future__ import annotations

from fastapi import HTTPException, Request

from backend.users import ROLE_RANK, CurrentUser, user_for_api_key, user_for_session

SESSION_COOKIE = "pg_session"


def user_from_request(pg, headers, cookies) -> CurrentUser | None:
    """Shared by FastAPI routes and Gradio handlers (gr.Request has headers and cookies too)."""
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return user_for_api_key(pg.db, auth[7:].strip())
    token = cookies.get(SESSION_COOKIE)
    return user_for_session(pg.db, token) if token else None


def current_user(request: Request) -> CurrentUser:
    user = user_from_request(request.app.state.pg, request.headers, request.cookies)
    if user is None:
        raise HTTPException(401, "not logged in: send 'Authorization: Bearer KEY' or log in", headers={"WWW-Authenticate": "Bearer"})
    return user


def require(role: str):
    """A FastAPI dependency admitting `role` and every role above it."""
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}")

    def dependency(request: Request) -> CurrentUser:
        user = current_user(request)
        if not user.can(role):
            raise HTTPException(403, f"this needs the {role} role; {user.name} is {user.role}")
        return user

    dependency.required_role = role  # read by the test that walks every route
    return dependency
