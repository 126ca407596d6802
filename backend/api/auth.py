"""Login for the browser (HttpOnly session cookie), who-am-I, and user management for admins."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from backend import users
from backend.auth import SESSION_COOKIE, client_address, require
from backend.throttle import Throttled
from backend.users import CurrentUser

router = APIRouter(tags=["auth"])


class Login(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: str


@router.post("/api/login", dependencies=[Depends(require("public"))])
def login(body: Login, request: Request, response: Response) -> dict:
    pg = request.app.state.pg
    who = {"password_account": body.name, "password_address": client_address(request)}
    try:  # a throttled caller is refused before the (deliberately slow) password hash runs
        pg.throttle.check(**who)
    except Throttled as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    user = users.authenticate_password(pg.db, body.name, body.password)
    if user is None:
        pg.throttle.failed(**who)
        raise HTTPException(401, "wrong name or password")
    token = users.start_session(pg.db, user)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", max_age=users.SESSION_DAYS * 86400,
                        secure=request.url.scheme == "https", path="/")
    return {"name": user.name, "role": user.role}


@router.post("/api/logout", dependencies=[Depends(require("public"))])
def logout(request: Request, response: Response) -> dict:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        users.end_session(request.app.state.pg.db, token)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"ok": True}


@router.get("/api/me")
def me(user: CurrentUser = Depends(require("learner"))) -> dict:
    return {"id": user.id, "name": user.name, "role": user.role}


@router.get("/api/users")
def list_users(request: Request, user: CurrentUser = Depends(require("admin"))) -> list[dict]:
    return users.list_users(request.app.state.pg.db)


@router.post("/api/users")
def add_user(body: NewUser, request: Request, user: CurrentUser = Depends(require("admin"))) -> dict:
    try:
        new, password, api_key = users.add_user(request.app.state.pg.db, body.name, body.role)
    except ValueError as e:
        raise HTTPException(422, str(e))
    return {"name": new.name, "role": new.role, "password": password, "api_key": api_key}


@router.post("/api/users/{name}/disable")
def disable_user(name: str, request: Request, user: CurrentUser = Depends(require("admin"))) -> dict:
    if name == user.name:
        raise HTTPException(422, "you cannot disable yourself")
    try:
        users.set_active(request.app.state.pg.db, name, False)
    except ValueError as e:
        raise HTTPException(404, str(e))
    return {"name": name, "active": False}
