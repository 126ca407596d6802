"""REST for the tokenizer explorer and BPE training.

    GET  /api/encodings                                   -> {"encodings": [names]}
    POST /api/tokenize {"text", "encoding", "allow_special"} -> {"encoding", "count", "counts", "tokens": [...]}
         each token: {"id", "text", "bytes": [ints], "start", "end" (character offsets), "partial", "special"}
    POST /api/tokenize/compare {"text", "a", "b"}        -> counts of both and the difference
    POST /api/tokenize/presplit {"text", "encoding"}     -> the regex chunks before BPE
    POST /api/tokenize/chat {"messages", "encoding", "add_generation_prompt"} -> ids, mask, text, tokens
    GET  /api/encodings/{name}/merge-tree/{token_id}     -> how BPE built the token
    POST /api/bpe/steps {"corpus" | "text", "pattern", "steps"}  -> the first merges, one by one
    POST /api/bpe/train {"corpus" | "text", "pattern", "vocab_size", "name"} -> trains with rustbpe, registers
    POST /api/bpe/curve {"corpus" | "text", "pattern", "vocab_size"} -> tokens per 1000 chars vs vocab size

Errors: unknown encoding 404, text over MAX_TEXT_CHARS 413, lone surrogates and other bad input 422.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from backend import bpe, corpora
from backend import tokenizer_explorer as tx
from backend.auth import require

router = APIRouter()

MAX_CORPUS_CHARS = 20_000_000   # a request-sized training corpus; bigger ones belong to a job
MAX_STEPS = 2_000


class TokenizeRequest(BaseModel):
    text: str
    encoding: str = "cl100k_base"
    allow_special: bool = Field(True, description="text like <|endoftext|> becomes the special token")


class CompareRequest(BaseModel):
    text: str
    a: str = "cl100k_base"
    b: str = "smollm2"


class ChatRequest(BaseModel):
    messages: list[dict]
    encoding: str = "smollm2"
    add_generation_prompt: bool = True


class CorpusRequest(BaseModel):
    corpus: str | None = Field(None, description=f"built-in corpus: {', '.join(corpora.BUILTIN_CORPORA)}")
    text: str | None = Field(None, description="pasted corpus text (instead of corpus)")
    max_chars: int = Field(1_000_000, ge=1, le=MAX_CORPUS_CHARS)
    pattern: str = Field("gpt4", description="gpt4, gpt2, none, or a custom regex")


class StepsRequest(CorpusRequest):
    steps: int = Field(20, ge=1, le=MAX_STEPS)


class TrainRequest(CorpusRequest):
    vocab_size: int = Field(4096, ge=257, le=bpe.MAX_VOCAB)
    name: str


class CurveRequest(CorpusRequest):
    vocab_size: int = Field(4096, ge=257, le=bpe.MAX_VOCAB)


def _data_dir(request: Request):
    return request.app.state.pg.cfg.data_dir


def _encoding(request: Request, name: str):
    try:
        return tx.get_encoding(name, _data_dir(request))
    except ValueError as e:  # UnknownEncoding names the encoding and lists the available ones
        raise HTTPException(404, str(e)) from None


def _text(text: str, field: str = "text") -> str:
    try:
        return tx.check_text(text, field)
    except tx.TextTooLong as e:
        raise HTTPException(413, str(e)) from None
    except tx.TextError as e:
        raise HTTPException(422, str(e)) from None


def _bad(e: ValueError):
    return HTTPException(422, str(e))


@router.get("/api/encodings", dependencies=[Depends(require("public"))])
def encodings(request: Request) -> dict:
    return {"encodings": tx.list_encodings(_data_dir(request)), "max_text_chars": tx.MAX_TEXT_CHARS}


@router.post("/api/tokenize", dependencies=[Depends(require("public"))])
def tokenize(req: TokenizeRequest, request: Request) -> dict:
    text = _text(req.text)
    return tx.explore(_encoding(request, req.encoding), text, req.allow_special)


@router.post("/api/tokenize/compare", dependencies=[Depends(require("public"))])
def compare(req: CompareRequest, request: Request) -> dict:
    text = _text(req.text)
    return tx.compare(_encoding(request, req.a), _encoding(request, req.b), text)


@router.post("/api/tokenize/presplit", dependencies=[Depends(require("public"))])
def presplit(req: TokenizeRequest, request: Request) -> dict:
    text = _text(req.text)
    chunks = tx.presplit(_encoding(request, req.encoding), text, req.allow_special)
    return {"encoding": req.encoding, "count": len(chunks), "chunks": chunks}


@router.post("/api/tokenize/chat", dependencies=[Depends(require("public"))])
def chat(req: ChatRequest, request: Request) -> dict:
    try:
        enc = tx.chat_encoding(req.encoding, _data_dir(request))
    except ValueError as e:
        raise HTTPException(404, str(e)) from None
    for i, m in enumerate(req.messages):
        _text(str(m.get("content", "")), f"messages[{i}].content")
    try:
        return tx.chat_view(req.messages, enc, req.add_generation_prompt)
    except ValueError as e:
        raise _bad(e) from None


@router.get("/api/encodings/{name}/merge-tree/{token_id}", dependencies=[Depends(require("public"))])
def merge_tree(name: str, token_id: int, request: Request) -> dict:
    enc = _encoding(request, name)
    try:
        tree = tx.merge_tree(enc, token_id)
    except ValueError as e:
        raise HTTPException(404, str(e)) from None
    return {"encoding": name, "token_id": token_id, "tree": tx.tree_to_json(tree), "lines": tx.merge_tree_lines(tree)}


def _corpus(req: CorpusRequest) -> str:
    if (req.corpus is None) == (req.text is None):
        raise HTTPException(422, "give exactly one of corpus (a built-in name) or text")
    if req.text is not None:
        if len(req.text) > MAX_CORPUS_CHARS:
            raise HTTPException(413, f"text is {len(req.text):,} characters; the limit is {MAX_CORPUS_CHARS:,}")
    try:
        return corpora.load_corpus(req.corpus, text=req.text, max_chars=req.max_chars)
    except ValueError as e:
        raise _bad(e) from None


@router.post("/api/bpe/steps", dependencies=[Depends(require("public"))])
def bpe_steps(req: StepsRequest) -> dict:
    text = _corpus(req)
    try:
        trainer = bpe.BPETrainer(text, req.pattern)
    except ValueError as e:
        raise _bad(e) from None
    merges = [trainer.step() for _ in range(req.steps)]
    return {"chars": len(text), "merges": [
        {"pair": list(m.pair), "count": m.count, "new_id": m.new_id, "text": m.bytes.decode("utf-8", "replace"),
         "bytes": list(m.bytes), "describe": m.describe()} for m in merges if m is not None]}


@router.post("/api/bpe/train", dependencies=[Depends(require("learner"))])
def bpe_train(req: TrainRequest, request: Request) -> dict:
    text = _corpus(req)
    try:
        return bpe.train_and_register(text, req.vocab_size, req.pattern, req.name, _data_dir(request),
                                      source=req.corpus or "pasted text")
    except ValueError as e:
        raise _bad(e) from None


@router.post("/api/bpe/curve", dependencies=[Depends(require("learner"))])
def bpe_curve(req: CurveRequest) -> dict:
    text = _corpus(req)
    try:
        ranks = bpe.train_rustbpe(text, req.vocab_size, req.pattern)
        return {"chars": len(text), "curve": bpe.length_curve(text, ranks, req.pattern)}
    except ValueError as e:
        raise _bad(e) from None
