"""REST for the chat's tools: the search index's documents, search, and the Python sandbox.

    GET    /api/documents[?source=]      learner   -> [{"id", "title", "source", "chars", "created_at", "created_by"}]
    GET    /api/documents/{id}           learner   -> the document with its text
    POST   /api/documents {"title", "text", "source"="user"}   operator -> the new document
    DELETE /api/documents/{id}           operator
    POST   /api/tools/search {"query", "k"=5, "source"="auto"|"local"|"web"}   learner
           -> {"results": [{"id", "title", "snippet", "score", "source"(, "url")}], "source", "note", "text"}
    POST   /api/tools/python {"code"}    learner   -> SandboxResult fields + "text" (what a model reads)
    GET    /api/tools/python             learner   -> which isolation is available here, and the limits

Reading and using the tools needs any logged-in user (learners chat with tools too); changing the index
needs the operator role. Bad input: 422 naming the field; unknown document 404; sandbox or web search
unavailable 503. The sandbox runs on a worker thread, so the server keeps answering while code runs.
"""
from __future__ import annotations


from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from backend.api.errors import service_errors
from backend.auth import require
from backend.tools.sandbox import SandboxBusy, SandboxUnavailable
from backend.tools.search import MAX_K, MAX_QUERY_CHARS, MAX_TEXT_CHARS, MAX_TITLE_CHARS, WebSearchUnavailable, format_results
from backend.users import CurrentUser

router = APIRouter(prefix="/api", tags=["tools"])
learner, operator = require("learner"), require("operator")


def tool_errors():
    return service_errors(unavailable=(SandboxUnavailable, SandboxBusy, WebSearchUnavailable))


class NewDocument(BaseModel):
    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    source: str = Field("user", min_length=1, max_length=200)


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(5, ge=1, le=MAX_K)
    source: str = Field("auto", pattern="^(auto|local|web)$")


class PythonRequest(BaseModel):
    code: str = Field(min_length=1)


@router.get("/documents")
def list_documents(request: Request, source: str | None = None, user: CurrentUser = Depends(learner)) -> list[dict]:
    return request.app.state.pg.search.list_documents(source)


@router.get("/documents/{doc_id}")
def get_document(doc_id: int, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    with tool_errors():
        return request.app.state.pg.search.get_document(doc_id)


@router.post("/documents")
def add_document(body: NewDocument, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    with tool_errors():
        return request.app.state.pg.search.add_document(body.title, body.text, body.source, created_by=user.id)


@router.delete("/documents/{doc_id}")
def remove_document(doc_id: int, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    with tool_errors():
        request.app.state.pg.search.remove_document(doc_id)
    return {"ok": True}


@router.post("/tools/search")
def search(body: SearchRequest, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    with tool_errors():
        out = request.app.state.pg.search.search_tool(body.query, body.k, body.source)
    return {**out, "text": format_results(out["results"])}


@router.post("/tools/python")
def run_python(body: PythonRequest, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    # A plain (sync) route: FastAPI runs it on its thread pool, off the event loop.
    sandbox = request.app.state.pg.sandbox
    if len(body.code) > sandbox.limits.max_code_chars:
        raise HTTPException(422, f"code is {len(body.code)} characters; the limit is {sandbox.limits.max_code_chars}")
    with tool_errors():
        result = sandbox.run(body.code)
    return {**result.to_dict(), "text": result.as_text()}


@router.get("/tools/python")
def sandbox_info(request: Request, user: CurrentUser = Depends(learner)) -> dict:
    return request.app.state.pg.sandbox.describe()
