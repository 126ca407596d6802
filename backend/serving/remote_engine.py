"""A registered model that another server serves: the Engine interface over an OpenAI-compatible /v1.

vLLM, SGLang, llama.cpp's server, TGI and another instance of this app all speak /v1/completions and
/v1/chat/completions with SSE streaming. The tabs hand an engine token ids; here they are turned back
into text with the model's local tokenizer (which should be the server's) and sent as text, so the
server tokenizes them as it always does. A chat prompt (`chat_prompt`) remembers its messages and goes
to /v1/chat/completions, so the server applies its own chat template.

What only local weights can give (step mode, prompt log-probs, constrained decoding) raises
RemoteUnsupported, a ValueError whose message every door shows as it is.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from types import SimpleNamespace
from typing import Iterator

import httpx
import torch

from backend.serving.engine import Engine, TokenEvent
from backend.serving.sampling import SamplingParams


class RemoteUnsupported(ValueError):
    """A feature that needs the model's weights in this process."""


class RemoteError(ValueError):
    """The serving engine could not be reached or refused the request."""


class ChatPrompt(list):
    """Token ids of a rendered chat (for length checks and display) that remember their messages."""

    def __init__(self, ids: list[int], messages: list[dict]):
        super().__init__(ids)
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]


_DONE = object()


class NoWeights:
    """What `engine.model` is for a remote model: its config (vocabulary size, context) for the code that
    checks ids against it, and a clear RemoteUnsupported for anything that would run the network here."""

    def __init__(self, engine: "RemoteEngine"):
        self.cfg = SimpleNamespace(vocab_size=engine.enc.n_vocab, max_seq_len=engine.context_length)
        self._why = (f"model {engine.name!r} is served by {engine.base_url}: its weights are not in this process, "
                     "so step mode and next-token distributions are not available")

    def __call__(self, *args, **kwargs):
        raise RemoteUnsupported(self._why)

    def __getattr__(self, name):
        raise RemoteUnsupported(self._why)


def _token_bytes_from_str(s: str) -> bytes:
    """A token string as servers report it: text, or `bytes:\\xNN...` for bytes that are not UTF-8 alone."""
    if s.startswith("bytes:"):
        try:
            return bytes(int(h, 16) for h in s[6:].split("\\x")[1:])
        except ValueError:
            pass
    return s.encode("utf-8")


class RemoteEngine:
    # Token, prompt and whole-answer helpers are the Engine's own: they only call generate / encode.
    encode = Engine.encode
    token_bytes = Engine.token_bytes
    token_str = Engine.token_str
    default_stop_ids = Engine.default_stop_ids
    check_fits = Engine.check_fits
    collect = Engine.collect
    complete_batch = Engine.complete_batch
    complete = Engine.complete
    chat = Engine.chat
    stream_text = Engine.stream_text

    def close(self) -> None:
        """Unloaded from the pool: nothing is held here (the remote server keeps its model)."""

    def __init__(self, spec, enc, timeout: float = 300.0):
        if spec.kind != "remote" or not spec.remote:
            raise ValueError(f"model {spec.name!r} is not a remote model")
        self.spec = spec
        self.enc = enc
        self.base_url = spec.remote["base_url"].rstrip("/")
        self.remote_model = spec.remote["model"]
        self.context_length = int(spec.context_length)
        self._token_bytes: dict[int, bytes] = {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
        self.model = NoWeights(self)
        self.device = torch.device("cpu")

    @property
    def name(self) -> str:
        return self.spec.name

    def next_token_logits(self, ids: list[int]):
        return self.model(ids)  # NoWeights: the clear RemoteUnsupported for step mode

    def prompt_logprobs(self, prompt_ids: list[int], k: int = 0):
        raise RemoteUnsupported(f"model {self.name!r} is served by {self.base_url}: prompt log-probs are not "
                                "available for remote models")

    def chat_prompt(self, messages: list[dict]) -> ChatPrompt:
        return ChatPrompt(Engine.chat_prompt(self, messages), messages)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Stream events for len(prompts) * n samples (index i * n + j), one request per prompt."""
        params.validate()
        if not prompts or n < 1:
            raise ValueError("need at least one prompt and n >= 1")
        if params.constraint is not None:
            raise RemoteUnsupported(f"model {self.name!r} is served by {self.base_url}: constrained decoding "
                                    "needs the model's logits in this process")
        for p in prompts:
            self.check_fits(len(p), params.max_tokens)
            if min(p) < 0 or max(p) >= self.enc.n_vocab:
                raise ValueError(f"prompt token ids must be in [0, {self.enc.n_vocab})")
        headers = self._headers()  # a missing API key fails here, before any request
        return self._generate(prompts, params, n, cancel, headers)

    def _headers(self) -> dict:
        var = self.spec.remote.get("api_key_env")
        if not var:
            return {}
        key = os.environ.get(var)
        if not key:
            raise RemoteError(f"model {self.name!r} reads its API key from ${var}, which is not set")
        return {"Authorization": f"Bearer {key}"}

    def _generate(self, prompts, params, n, cancel, headers) -> Iterator[TokenEvent]:
        if params.max_tokens == 0:
            for i in range(len(prompts) * n):
                yield TokenEvent(i, None, "", finish_reason="length")
            return
        stop = threading.Event()  # set when the consumer goes away
        if len(prompts) == 1:
            try:
                yield from self._stream(0, prompts[0], params, n, headers, cancel, stop)
            finally:
                stop.set()
            return
        # several prompts: one request each, at once, their events merged as they come
        q: queue.Queue = queue.Queue()

        def run(i: int, prompt: list[int]) -> None:
            try:
                for ev in self._stream(i, prompt, params, n, headers, cancel, stop):
                    q.put(ev)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                q.put(e)
            finally:
                q.put(_DONE)

        for i, p in enumerate(prompts):
            threading.Thread(target=run, args=(i, p), daemon=True, name=f"remote-{self.name}-{i}").start()
        try:
            remaining = len(prompts)
            while remaining:
                item = q.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()

    def _body(self, prompt: list[int], params: SamplingParams, n: int) -> tuple[str, dict]:
        body = {"model": self.remote_model, "n": n, "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_tokens, "stream": True}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM / llama.cpp / this app extension
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty  # vLLM / llama.cpp extension
        if isinstance(prompt, ChatPrompt):
            body["messages"] = prompt.messages
            if params.logprobs is not None:
                body["logprobs"], body["top_logprobs"] = True, params.logprobs
            return "/chat/completions", body
        # Special-token text (<|im_start|>) stays text: servers read it back as the special token.
        body["prompt"] = self.enc.decode(list(prompt), errors="replace")
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        return "/completions", body

    def _stream(self, i: int, prompt, params: SamplingParams, n: int, headers: dict, cancel, stop) -> Iterator[TokenEvent]:
        path, body = self._body(prompt, params, n)
        url = self.base_url + path
        try:
            with self.http.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise RemoteError(f"{url} answered {resp.status_code}: {_error_message(resp)}")
                for line in resp.iter_lines():
                    if (cancel is not None and cancel.is_set()) or stop.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    obj = json.loads(data)
                    if obj.get("error"):
                        err = obj["error"]
                        raise RemoteError(f"{url} failed: {err.get('message', err) if isinstance(err, dict) else err}")
                    for choice in obj.get("choices") or []:
                        yield from self._events(i * n + int(choice.get("index", 0)), choice, params)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach {url} for model {self.name!r}: {type(e).__name__}: {e}") from e

    def _events(self, idx: int, choice: dict, params: SamplingParams) -> Iterator[TokenEvent]:
        """One streamed choice chunk -> token events (local ids) + an end event when it finishes."""
        if "delta" in choice:  # chat
            text = (choice.get("delta") or {}).get("content") or ""
            lp = choice.get("logprobs")
            entries = None if lp is None else [
                (_entry_bytes(e), e.get("logprob"), [(_entry_bytes(t), t.get("logprob")) for t in e.get("top_logprobs") or []])
                for e in lp.get("content") or []]
        else:  # completions
            text = choice.get("text") or ""
            lp = choice.get("logprobs")
            entries = None if lp is None else [
                (_token_bytes_from_str(t), v, [(_token_bytes_from_str(s), w) for s, w in (top or {}).items()])
                for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [],
                                     lp.get("top_logprobs") or [None] * len(lp.get("tokens") or []))]
        if params.logprobs is not None and entries is None and text:
            raise RemoteUnsupported(f"{self.base_url} returned no token probabilities for {self.remote_model!r}")
        fr = choice.get("finish_reason")
        stop_entry = None
        if entries and fr == "stop" and self._local_id(entries[-1][0]) in {*params.stop_token_ids,
                                                                          *self.default_stop_ids()}:
            # vLLM (and this app's /v1/completions) give the stop token its log-prob entry: the end event's
            *entries, stop_entry = entries
        if entries:
            for j, (b, v, top) in enumerate(entries):
                tops = [(self._local_id(tb), tv) for tb, tv in top][:params.logprobs or 0]
                yield TokenEvent(idx, self._local_id(b), text if j == len(entries) - 1 else "", v, tops)
        elif text and stop_entry is None:
            ids = self.encode(text)
            for j, t in enumerate(ids):
                yield TokenEvent(idx, t, text if j == len(ids) - 1 else "")
        if stop_entry is not None:
            b, v, top = stop_entry
            tops = [(self._local_id(tb), tv) for tb, tv in top][:params.logprobs or 0]
            yield TokenEvent(idx, None, "" if entries else text, v, tops, finish_reason="stop",
                             stop_token_id=self._local_id(b))
        elif fr:
            # A server that stopped on its end-of-turn token does not say which; name the first stop token asked for.
            stop_id = params.stop_token_ids[0] if fr == "stop" and params.stop_token_ids else None
            yield TokenEvent(idx, None, "", finish_reason="length" if fr == "length" else "stop", stop_token_id=stop_id)

    def _local_id(self, b: bytes) -> int:
        try:
            return self.enc.encode_single_token(b)
        except KeyError:
            raise RemoteUnsupported(
                f"the server's token {b!r} is not one token of {self.name!r}'s tokenizer {self.spec.tokenizer!r}: "
                "register the model with the tokenizer the server uses to see token probabilities") from None


def _entry_bytes(e: dict) -> bytes:
    b = e.get("bytes")
    return bytes(b) if isinstance(b, list) else _token_bytes_from_str(e.get("token") or "")


def _error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            return err.get("message") or json.dumps(err)
        if err:
            return str(err)
        detail = resp.json().get("detail")
        if detail:
            return str(detail)
    except (ValueError, AttributeError):
        pass
    return resp.text[:300] or resp.reason_phrase


def check_remote(base_url: str, remote_model: str, api_key: str | None = None, timeout: float = 10.0) -> dict:
    """The server's /v1/models card for `remote_model` (RemoteError when unreachable or not listed).
    vLLM's card carries `max_model_len`, which add-remote takes as the context length."""
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise RemoteError(f"cannot reach {url}: {type(e).__name__}: {e}") from e
    if resp.status_code >= 400:
        raise RemoteError(f"{url} answered {resp.status_code}: {_error_message(resp)}")
    try:
        cards = resp.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"{url} did not answer with an OpenAI model list") from None
    for c in cards:
        if isinstance(c, dict) and c.get("id") == remote_model:
            return c
    ids = ", ".join(str(c.get("id")) for c in cards if isinstance(c, dict))
    raise RemoteError(f"{url} does not serve a model named {remote_model!r}; it serves: {ids or 'nothing'}")


def remote_engine(spec, data_dir) -> RemoteEngine:
    """The engine EnginePool keeps for a registered remote model."""
    from models.tokenizers import get_encoding
    return RemoteEngine(spec, get_encoding(spec.tokenizer, data_dir))


def register_remote(registry, name: str, base_url: str, remote_model: str, api_key_env: str | None = None,
                    tokenizer: str = "cl100k_base", chat_format: str | None = "chatml",
                    context_length: int | None = None, description: str = "", check: bool = True,
                    overwrite: bool = False):
    """Register a served model (the one service behind the CLI, REST and the UI). With `check`, the
    server must list `remote_model` first; its card's `max_model_len` is the default context length."""
    from models.registry import validate_name
    validate_name(name)  # bad input is refused before any request goes out
    if check:
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RemoteError(f"the API key is to be read from ${api_key_env}, which is not set")
        card = check_remote(base_url, remote_model, key)
        if context_length is None and isinstance(card.get("max_model_len"), int):
            context_length = card["max_model_len"]
    return registry.add_remote(name, base_url, remote_model, tokenizer=tokenizer, chat_format=chat_format,
                               context_length=context_length or 4096, api_key_env=api_key_env,
                               description=description, overwrite=overwrite)
