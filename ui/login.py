"""Sign-in strip in the page header (one for every tab), and `door`: the access rule every Gradio handler declares.

The browser posts to /api/login, which sets an HttpOnly
session cookie; Gradio handlers and the ranking widget are then recognised by that cookie."""
from __future__ import annotations

import functools
import inspect
import typing

import gradio as gr

from backend.auth import RULES, AccessDenied, check, user_from_request

SKELETON = '<div class="pg-login" style="display:flex;gap:.5em;align-items:center;flex-wrap:wrap"></div>'

# Runs in the browser once the block mounts. Text goes in with textContent, never innerHTML.
JS = r"""
const box = element.querySelector('.pg-login');
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  return e;
}
function changed() {  // who is signed in changed: the ranking widget reloads, role-gated views update
  window.dispatchEvent(new Event('pg-auth'));
  const b = document.getElementById('pg-auth-refresh');
  if (b) b.click();
}
async function refresh() {
  const r = await fetch('/api/me', {credentials: 'same-origin'});
  box.replaceChildren();
  if (r.ok) {
    const me = await r.json();
    const out = el('button', {'class': 'pg-logout', type: 'button'}, 'Log out');
    out.onclick = async () => { await fetch('/api/logout', {method: 'POST', credentials: 'same-origin'});
                                changed(); refresh(); };
    box.append(el('span', {'class': 'pg-whoami'}, 'Signed in as ' + me.name + ' (' + me.role + ')'), out);
    return;
  }
  const form = el('form', {'class': 'pg-login-form', style: 'display:flex;gap:.5em;align-items:center'});
  const look = 'border:1px solid var(--border-color-primary,#ccc);border-radius:6px;padding:.35em .5em;width:10em';
  const name = el('input', {name: 'name', placeholder: 'name', autocomplete: 'username', 'aria-label': 'name', style: look});
  const pw = el('input', {name: 'password', type: 'password', placeholder: 'password', autocomplete: 'current-password', 'aria-label': 'password', style: look});
  const msg = el('span', {'class': 'pg-login-msg'});
  form.append(name, pw, el('button', {type: 'submit'}, 'Log in'), msg);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const r = await fetch('/api/login', {method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify({name: name.value, password: pw.value})});
    if (r.ok) { changed(); refresh(); }
    else { msg.textContent = 'Wrong name or password.'; }
  };
  box.append(form);
}
refresh();
"""


def build_login() -> gr.HTML:
    return gr.HTML(SKELETON, js_on_load=JS, elem_classes=["pg-login-block"])


def request_user(pg, request: gr.Request | None, role: str):
    """The signed-in user of a Gradio event, checked for `role`; raises gr.Error otherwise."""
    user = user_from_request(pg, request.headers, request.cookies) if request is not None else None
    if user is None:
        raise gr.Error("Log in first (top of this tab).")
    if not user.can(role):
        raise gr.Error(f"This needs the {role} role; you are {user.role}.")
    return user


def door(pg, rule: str):
    """Declare and enforce who may call a Gradio event handler: one of backend.auth.RULES ("public",
    "inference", or a role), checked on the server before the handler runs (gr.Error otherwise).
    Every handler is wrapped so (tests/test_access.py walks them all):

        btn.click(door(pg, "learner")(on_train), ...)      or      @door(pg, "operator") above a def
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")

    def wrap(fn):
        sig = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except (NameError, TypeError):
            hints = dict(getattr(fn, "__annotations__", {}))
        own = next((n for n in sig.parameters if hints.get(n) in (gr.Request, typing.Optional[gr.Request])), None)
        params = list(sig.parameters.values())
        if own is None:  # ask Gradio for the request under a name the handler never sees
            params.append(inspect.Parameter("door_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                            annotation=gr.Request))
        full = sig.replace(parameters=params)

        def admit(args, kwargs):
            bound = full.bind(*args, **kwargs)
            request = bound.arguments.get(own or "door_request")
            if own is None:
                bound.arguments.pop("door_request", None)
            if rule != "public":
                try:
                    check(pg, rule, request)
                except AccessDenied as e:
                    raise gr.Error(_ui_message(e)) from None
            return bound.args, bound.kwargs

        if inspect.isasyncgenfunction(fn):
            async def wrapper(*args, **kwargs):
                a, k = admit(args, kwargs)
                async for out in fn(*a, **k):
                    yield out
        elif inspect.iscoroutinefunction(fn):
            async def wrapper(*args, **kwargs):
                a, k = admit(args, kwargs)
                return await fn(*a, **k)
        elif inspect.isgeneratorfunction(fn):
            def wrapper(*args, **kwargs):
                a, k = admit(args, kwargs)
                yield from fn(*a, **k)
        else:
            def wrapper(*args, **kwargs):
                a, k = admit(args, kwargs)
                return fn(*a, **k)
        functools.update_wrapper(wrapper, fn)
        wrapper.__signature__ = full
        wrapper.__annotations__ = {**hints, **({} if own else {"door_request": gr.Request})}
        wrapper.door_rule = rule
        return wrapper

    return wrap


def public(fn):
    """A handler anybody may call: UI glue that only reads public state (presets, model lists)."""
    fn.door_rule = "public"
    return fn


def _ui_message(e: AccessDenied) -> str:
    if e.status == 401:
        return "Log in first (top of this tab)."
    return e.message
