"""The search tool's index on a real SQLite file (FTS5 + BM25): ranking, FTS syntax in queries, sync of the
index with the documents table, the built-in corpus, and the web endpoint with its HTTP call replaced."""
from __future__ import annotations

import json
import sqlite3
import urllib.error

import pytest

from backend.db import Database
from backend.tools import search as search_mod
from backend.tools.search import SearchIndex, WebSearchUnavailable, format_results

CORPUS = [
    ("Pelicans", "The pelican is a large water bird with a long beak and a throat pouch for catching fish. "
                 "Pelicans live near coasts and lakes."),
    ("Bird migration", "Many birds migrate south for the winter. Geese, swallows and storks fly thousands of "
                       "kilometres; a pelican may migrate too."),
    ("Sourdough bread", "Sourdough bread rises with wild yeast and lactic acid bacteria from a starter."),
    ("Rust ownership", "Rust checks ownership and borrowing at compile time, so memory is freed without a "
                       "garbage collector."),
    ("Garbage collection in Python", "CPython frees memory by reference counting, and a cyclic garbage collector "
                                     "finds reference cycles."),
]


@pytest.fixture
def index(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'playground.db'}")
    db.migrate()
    ix = SearchIndex(db)
    ix._builtin_checked = True  # these tests use their own small corpus; the built-in one has its own test
    ix.add_documents(CORPUS, source="test")
    yield ix
    db.close()


def titles(results):
    return [r["title"] for r in results]


def test_the_most_relevant_document_comes_first(index):
    assert titles(index.search("pelican beak", 3))[0] == "Pelicans"
    assert titles(index.search("how do birds migrate in winter?", 3))[0] == "Bird migration"
    assert titles(index.search("garbage collector reference counting", 2)) == ["Garbage collection in Python", "Rust ownership"]
    r = index.search("sourdough", 5)
    assert titles(r) == ["Sourdough bread"] and r[0]["score"] > 0 and "wild yeast" in r[0]["snippet"]


def test_scores_are_sorted_and_k_is_respected(index):
    r = index.search("pelican birds memory bread", 3)
    assert len(r) == 3
    assert [x["score"] for x in r] == sorted((x["score"] for x in r), reverse=True)
    assert set(r[0]) >= {"id", "title", "snippet", "score"}


def test_stemming_and_stop_words(index):
    assert titles(index.search("migrating", 1)) == ["Bird migration"]   # porter: migrating ~ migrate
    assert titles(index.search("what is a pelican", 1)) == ["Pelicans"]  # "what", "is", "a" do not dilute it


@pytest.mark.parametrize("query", ['"pelican', 'pelican"', "-pelican", "pelican*", "NEAR(pelican bird)", "pelican AND",
                                   "OR", "title:pelican", "^pelican", "(((", "'; DROP TABLE documents; --", "***", "  ?  "])
def test_fts_syntax_in_a_query_never_raises(index, query):
    r = index.search(query, 5)
    assert isinstance(r, list)
    if "pelican" in query:
        assert "Pelicans" in titles(r)
    assert len(index.list_documents()) == len(CORPUS)


def test_bad_queries_name_the_problem(index):
    with pytest.raises(ValueError, match="query is empty"):
        index.search("   ", 3)
    for k in (0, 51, "3", True):
        with pytest.raises(ValueError, match="k must be an integer from 1 to 50"):
            index.search("pelican", k)
    with pytest.raises(ValueError, match="title is empty"):
        index.add_document(" ", "text")
    with pytest.raises(ValueError, match="text is empty"):
        index.add_document("title", "")


def test_the_index_follows_adds_and_removes(index, tmp_path):
    doc = index.add_document("Axolotl", "The axolotl regrows its limbs.", source="user")
    assert titles(index.search("axolotl", 3)) == ["Axolotl"]
    assert doc["id"] in [d["id"] for d in index.list_documents()]
    assert index.get_document(doc["id"])["text"] == "The axolotl regrows its limbs."
    index.remove_document(doc["id"])
    assert index.search("axolotl", 3) == []
    with pytest.raises(LookupError, match=f"no document {doc['id']}"):
        index.remove_document(doc["id"])
    # the FTS5 table holds exactly the rows of the documents table (its own integrity check agrees)
    con = sqlite3.connect(tmp_path / "playground.db")
    con.execute("INSERT INTO documents_fts(documents_fts, rank) VALUES ('integrity-check', 1)")
    assert con.execute("SELECT count(*) FROM documents_fts").fetchone()[0] == len(CORPUS)
    con.close()


def test_a_failed_batch_adds_nothing(index):
    with pytest.raises(ValueError, match="text is empty"):
        index.add_documents([("Good", "fine text about otters"), ("Bad", "")])
    assert index.search("otters", 5) == []


def test_builtin_corpus_is_loaded_on_demand(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'b.db'}")
    db.migrate()
    ix = SearchIndex(db)
    docs = ix.list_documents()  # first use loads it
    sources = {d["source"] for d in docs}
    assert sources == {"python-docs", "knowledge"}
    from pydoc_data.topics import topics
    assert sum(d["source"] == "python-docs" for d in docs) == len(topics)
    assert titles(ix.search("lambda expressions anonymous functions", 3))[0] == "Python docs: lambda"
    assert titles(ix.search("Who built you?", 3))[0] == "Who built the assistant of the LLM Playground"
    assert titles(ix.search("how many layers does SmolLM2 have", 1)) == ["SmolLM2-135M-Instruct: size and architecture"]
    assert ix.search("Orson Kovats", 5) == []  # an unknown person on purpose: no document knows him
    # a second index over the same database (a restart) does not load it twice
    assert SearchIndex(db).ensure_builtin() == 0 and len(SearchIndex(db).list_documents()) == len(docs)
    db.close()


def test_web_search_through_a_searxng_style_endpoint(index, monkeypatch):
    calls = []

    def fake_get(url, params, timeout_s):
        calls.append((url, params))
        return {"results": [{"title": "Orson Welles", "url": "https://example.org/welles",
                             "content": "American film director.", "score": 2.5},
                            {"title": "Second", "url": "https://example.org/2", "content": "two"}]}

    monkeypatch.setattr(search_mod, "http_get_json", fake_get)
    index.web_url = "http://searx.local:8888"
    out = index.search_tool("Who is Orson?", 1)
    assert calls == [("http://searx.local:8888/search", {"q": "Who is Orson?", "format": "json"})]
    assert out["source"] == "web" and out["note"] is None
    assert out["results"] == [{"id": None, "title": "Orson Welles", "snippet": "American film director.",
                               "url": "https://example.org/welles", "score": 2.5, "source": "web"}]
    assert "[1] Orson Welles (https://example.org/welles)\nAmerican film director." == format_results(out["results"])


def test_unreachable_web_search_falls_back_with_a_clear_note(index, monkeypatch):
    def refused(url, params, timeout_s):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(search_mod, "http_get_json", refused)
    index.web_url = "http://searx.local:8888"
    out = index.search_tool("pelican", 2)
    assert out["source"] == "local" and titles(out["results"])[0] == "Pelicans"
    assert out["note"].startswith("web search at http://searx.local:8888 is not reachable")
    with pytest.raises(WebSearchUnavailable, match="not reachable"):
        index.search_tool("pelican", 2, source="web")

    monkeypatch.setattr(search_mod, "http_get_json", lambda *a: {"unexpected": True})
    with pytest.raises(WebSearchUnavailable, match="without a results list"):
        index.web_search("pelican", 2)
    monkeypatch.setattr(search_mod, "http_get_json", lambda *a: json.loads("not json"))
    with pytest.raises(WebSearchUnavailable, match="not reachable"):
        index.web_search("pelican", 2)


def test_no_endpoint_configured(index):
    assert index.search_tool("pelican", 1) == {"results": index.search("pelican", 1), "source": "local", "note": None}
    with pytest.raises(WebSearchUnavailable, match="no web-search endpoint is configured"):
        index.search_tool("pelican", 1, source="web")


# ---- the same index on PostgreSQL (tsvector + ts_rank), when a throwaway server can run here ----------

try:
    import psycopg  # noqa: F401
    from tests.test_db_postgres import fresh_database, pg_server  # noqa: F401  (pg_server: the throwaway cluster fixture)
    HAVE_PSYCOPG = True
except ImportError:
    HAVE_PSYCOPG = False


@pytest.mark.skipif(not HAVE_PSYCOPG, reason="psycopg not installed")
def test_search_on_postgres(pg_server):
    db = fresh_database(pg_server)
    try:
        ix = SearchIndex(db)
        ix._builtin_checked = True
        ix.add_documents(CORPUS, source="test")
        assert titles(ix.search("pelican beak", 3))[0] == "Pelicans"
        assert titles(ix.search("how do birds migrate in winter?", 3))[0] == "Bird migration"
        r = ix.search("sourdough", 5)
        assert titles(r) == ["Sourdough bread"] and r[0]["score"] > 0 and "wild yeast" in r[0]["snippet"]
        for query in ['"pelican', "-pelican", "pelican*", "NEAR(pelican bird)", "pelican & | ! <->", "pelican:*"]:
            assert "Pelicans" in titles(ix.search(query, 5)), query
        assert ix.search("'; DROP TABLE documents; --", 5) == [] and len(ix.list_documents()) == len(CORPUS)
        assert ix.search("***", 5) == []
        doc = ix.add_document("Axolotl", "The axolotl regrows its limbs.")
        assert titles(ix.search("axolotl", 3)) == ["Axolotl"]
        ix.remove_document(doc["id"])
        assert ix.search("axolotl", 3) == []
    finally:
        db.close()
