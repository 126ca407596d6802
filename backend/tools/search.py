"""The search tool: a full-text index of documents in the project's database, and an optional web search.

    index = SearchIndex(db, web_url=None)
    index.add_document("title", "text", source="user") -> {"id", "title", "source", "chars", ...}
    index.list_documents(); index.remove_document(id)
    index.search("query", k=5) -> [{"id", "title", "snippet", "score", "source"}]   # best first
    index.search_tool("query", k=5, source="auto") -> {"results", "source", "note"}   # what the chat tool calls
    format_results(results) -> str                                                   # what the model reads

SQLite: an FTS5 table (porter stemming) mirrors `documents` through triggers (migration 0003), ranked by
BM25 (`bm25()`, title weighted twice the text). PostgreSQL: `to_tsvector`/`ts_rank` over a GIN index.
A query is split into words; each word is quoted and the words are OR-ed, so FTS syntax in a query
(quotes, -, *, NEAR, AND) is searched as text and never raises; common English stop words are dropped
unless nothing else is left. More matching words and rarer words rank higher.

The built-in corpus is loaded on demand (first search or listing in a process, for any built-in source
that has no documents yet): the Python documentation topics, one document per topic, and the project's
knowledge set (backend/tools/knowledge.jsonl).

A web-search endpoint (SearxNG-style JSON API: GET {url}/search?q=...&format=json) is used when
configured and reachable; when it is not, `search_tool` says so in its note and answers from the index.
"""
from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sqlalchemy import delete, func, select, text

from backend.db.models import Document

KNOWLEDGE_PATH = Path(__file__).resolve().parent / "knowledge.jsonl"
BUILTIN_SOURCES = {
    "python-docs": "Python documentation topics (pydoc_data.topics), one document per topic",
    "knowledge": "facts about this playground and a few things a small model cannot know (backend/tools/knowledge.jsonl)",
}
MAX_K = 50
MAX_QUERY_CHARS = 1000
MAX_TITLE_CHARS = 500
MAX_TEXT_CHARS = 1_000_000
MAX_TERMS = 32
SNIPPET_TOKENS = 40
STOP_WORDS = frozenset("""a an and are as at be by can do does for from has have how i in is it its me my of on
or that the this to was what when where which who whom why will with you your""".split())


class WebSearchUnavailable(RuntimeError):
    """The web-search endpoint is not configured, not reachable, or answered something unusable."""


def query_terms(query: str) -> list[str]:
    """Words of a query (letters/digits), stop words dropped unless nothing else is left."""
    words = re.findall(r"\w+", query.lower())
    content = [w for w in words if w not in STOP_WORDS]
    terms = list(dict.fromkeys(content or words))  # unique, in order
    return terms[:MAX_TERMS]


def fts5_match(terms: list[str]) -> str:
    """An FTS5 MATCH expression: every term a quoted string (so NEAR, -, * are plain text), OR-ed."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def check_query(query, k) -> tuple[str, int]:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
    return query.strip(), k


class SearchIndex:
    def __init__(self, db, web_url: str | None = None, web_timeout_s: float = 5.0):
        self.db = db
        self.web_url = web_url.rstrip("/") if web_url else None
        self.web_timeout_s = web_timeout_s
        self._builtin_checked = False
        self._builtin_lock = threading.Lock()

    @property
    def dialect(self) -> str:
        return self.db.engine.dialect.name

    # ---- documents -------------------------------------------------------------------------------

    def add_document(self, title: str, text: str, source: str = "user", created_by: int | None = None) -> dict:
        return self.add_documents([(title, text)], source, created_by)[0]

    def add_documents(self, docs: list[tuple[str, str]], source: str = "user", created_by: int | None = None) -> list[dict]:
        """Add several documents in one transaction (all or none)."""
        if not isinstance(source, str) or not source.strip() or len(source) > 200:
            raise ValueError("source must be 1-200 characters")
        rows = []
        for title, body in docs:
            if not isinstance(title, str) or not title.strip():
                raise ValueError("title is empty")
            if len(title) > MAX_TITLE_CHARS:
                raise ValueError(f"title is {len(title)} characters; the limit is {MAX_TITLE_CHARS}")
            if not isinstance(body, str) or not body.strip():
                raise ValueError("text is empty")
            if len(body) > MAX_TEXT_CHARS:
                raise ValueError(f"text is {len(body)} characters; the limit is {MAX_TEXT_CHARS}")
            if "\x00" in title or "\x00" in body:
                raise ValueError("title or text contains a NUL character")
            rows.append(Document(title=title.strip(), text=body, source=source.strip(), created_by=created_by))
        with self.db.session() as s:
            s.add_all(rows)
            s.flush()  # ids; the FTS triggers run in this same transaction
            return [_doc_dict(d) for d in rows]

    def list_documents(self, source: str | None = None) -> list[dict]:
        self.ensure_builtin()
        q = select(Document.id, Document.title, Document.source, func.length(Document.text), Document.created_at,
                   Document.created_by).order_by(Document.id)
        if source:
            q = q.where(Document.source == source)
        with self.db.read() as s:
            return [{"id": i, "title": t, "source": src, "chars": n, "created_at": c.isoformat() if c else None,
                     "created_by": by} for i, t, src, n, c, by in s.execute(q)]

    def get_document(self, doc_id: int) -> dict:
        with self.db.read() as s:
            d = s.get(Document, doc_id)
            if d is None:
                raise LookupError(f"no document {doc_id}")
            return {**_doc_dict(d), "text": d.text}

    def remove_document(self, doc_id: int) -> None:
        with self.db.session() as s:
            if s.execute(delete(Document).where(Document.id == doc_id)).rowcount == 0:
                raise LookupError(f"no document {doc_id}")

    def ensure_builtin(self) -> int:
        """Load each built-in source that has no documents yet; returns how many documents were added."""
        if self._builtin_checked:
            return 0
        with self._builtin_lock:
            if self._builtin_checked:
                return 0
            added = 0
            with self.db.read() as s:
                present = set(s.scalars(select(Document.source).where(Document.source.in_(BUILTIN_SOURCES)).distinct()))
            for source in BUILTIN_SOURCES:
                if source not in present:
                    added += len(self.add_documents(builtin_documents(source), source))
            self._builtin_checked = True
            return added

    # ---- searching -------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5) -> list[dict]:
        """The k best documents for `query`, best first: [{"id", "title", "snippet", "score", "source"}]."""
        query, k = check_query(query, k)
        self.ensure_builtin()
        terms = query_terms(query)
        if not terms:
            return []  # only punctuation: nothing to look for
        with self.db.read() as s:
            if self.dialect == "sqlite":
                rows = s.execute(text(
                    "SELECT d.id, d.title, d.source, snippet(documents_fts, 1, '', '', ' … ', :n) AS snip, "
                    "bm25(documents_fts, 2.0, 1.0) AS rank "
                    "FROM documents_fts JOIN documents d ON d.id = documents_fts.rowid "
                    "WHERE documents_fts MATCH :q ORDER BY rank LIMIT :k"),
                    {"q": fts5_match(terms), "k": k, "n": SNIPPET_TOKENS}).all()
                # bm25() is lower-is-better (negative); the API says higher is better.
                return [{"id": i, "title": t, "snippet": _clean(sn), "score": round(-r, 4), "source": src}
                        for i, t, src, sn, r in rows]
            if self.dialect == "postgresql":
                rows = s.execute(text(
                    "SELECT d.id, d.title, d.source, ts_headline('english', d.text, q, "
                    "'MaxWords=40, MinWords=15, StartSel=\"\", StopSel=\"\"') AS snip, "
                    "ts_rank(to_tsvector('english', d.title || ' ' || d.text), q) AS rank "
                    "FROM documents d, to_tsquery('english', :q) q "
                    "WHERE to_tsvector('english', d.title || ' ' || d.text) @@ q ORDER BY rank DESC LIMIT :k"),
                    {"q": " | ".join(re.sub(r"\W", "", t) or "x" for t in terms), "k": k}).all()
                return [{"id": i, "title": t, "snippet": _clean(sn), "score": round(float(r), 4), "source": src}
                        for i, t, src, sn, r in rows]
        raise RuntimeError(f"full-text search is not implemented for {self.dialect}")

    def web_search(self, query: str, k: int = 5) -> list[dict]:
        """Results from the configured SearxNG-style endpoint; WebSearchUnavailable says why not."""
        query, k = check_query(query, k)
        if not self.web_url:
            raise WebSearchUnavailable("no web-search endpoint is configured (--web-search-url or PLAYGROUND_WEB_SEARCH_URL)")
        url = f"{self.web_url}/search"
        try:
            data = http_get_json(url, {"q": query, "format": "json"}, self.web_timeout_s)
        except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
            raise WebSearchUnavailable(f"web search at {self.web_url} is not reachable: {e}") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise WebSearchUnavailable(f"web search at {self.web_url} answered without a results list")
        out = []
        for rank, r in enumerate(x for x in results if isinstance(x, dict)):
            if len(out) == k:
                break
            score = r.get("score")
            out.append({"id": None, "title": str(r.get("title") or r.get("url") or ""),
                        "snippet": _clean(str(r.get("content") or ""))[:500], "url": str(r.get("url") or ""),
                        "score": round(float(score), 4) if isinstance(score, (int, float)) else round(1 / (rank + 1), 4),
                        "source": "web"})
        return out

    def search_tool(self, query: str, k: int = 5, source: str = "auto") -> dict:
        """What the chat's search tool and POST /api/tools/search call.

        source "local": the index; "web": the endpoint (WebSearchUnavailable if it cannot answer);
        "auto": the endpoint when configured and reachable, else the index with a note saying why.
        """
        if source not in ("auto", "local", "web"):
            raise ValueError(f"source must be auto, local or web, not {source!r}")
        query, k = check_query(query, k)
        note = None
        if source == "web" or (source == "auto" and self.web_url):
            try:
                return {"results": self.web_search(query, k), "source": "web", "note": None}
            except WebSearchUnavailable as e:
                if source == "web":
                    raise
                note = f"{e}; these results come from the local index"
        return {"results": self.search(query, k), "source": "local", "note": note}


def http_get_json(url: str, params: dict, timeout_s: float):
    """The one HTTP call of the search tool (tests replace it): GET url?params, parse the JSON body."""
    req = urllib.request.Request(f"{url}?{urllib.parse.urlencode(params)}",
                                 headers={"Accept": "application/json", "User-Agent": "llm-playground"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read(2_000_000).decode("utf-8"))


def builtin_documents(source: str) -> list[tuple[str, str]]:
    """(title, text) pairs of a built-in source."""
    if source == "python-docs":
        from pydoc_data.topics import topics
        return [(f"Python docs: {name}", topics[name]) for name in sorted(topics)]
    if source == "knowledge":
        docs = []
        for lineno, line in enumerate(KNOWLEDGE_PATH.read_text("utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                docs.append((record["title"], record["text"]))
        return docs
    raise ValueError(f"unknown built-in source {source!r}; built-in: {', '.join(BUILTIN_SOURCES)}")


def format_results(results: list[dict]) -> str:
    """Search results as the text a model reads after its search call."""
    if not results:
        return "No results."
    lines = []
    for n, r in enumerate(results, 1):
        where = f" ({r['url']})" if r.get("url") else ""
        lines.append(f"[{n}] {r['title']}{where}\n{r['snippet']}")
    return "\n\n".join(lines)


def _clean(snippet: str | None) -> str:
    return re.sub(r"\s+", " ", snippet or "").strip()


def _doc_dict(d: Document) -> dict:
    return {"id": d.id, "title": d.title, "source": d.source, "chars": len(d.text),
            "created_at": d.created_at.isoformat() if d.created_at else None, "created_by": d.created_by}
