"""The inference engine: KV-cached, batched sampling with streaming, stop handling and log-probs.

    engine = Engine(spec, model, enc)
    for ev in engine.generate([prompt_ids], SamplingParams(max_tokens=50), n=4):
        print(ev.index, repr(ev.text))          # streamed text of sample `index`

How a request runs:
- N samples of one prompt share one prefill (batch 1), then the KV cache is expanded to N rows.
  Several different prompts are prefilled together with left padding (KVCache.pad) and decoded in
  one batch; rows that finish are dropped from the batch.
- Each step samples through backend.sampling (temperature, top-k, top-p, a per-request generator).
- Text is streamed UTF-8 safely (a character split across tokens is released only when complete) and
  stop strings may span tokens: text that could still become a stop string is held back, and a
  matched stop string is cut from the output. Stop tokens end a sample and are not part of it.
- A single-flight guard (FIFO) lets one request at a time use the model; a cancelled request (its
  `cancel` event set, or its generator closed) releases the guard at the next step.
"""
from __future__ import annotations

import codecs
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from backend.decode_step import DecodeStep
from backend.sampling import SamplingParams, apply_penalties, make_generator, sample, token_logprobs


@dataclass
class TokenEvent:
    index: int                   # which sample (prompt i, sample j -> i * n + j)
    token_id: int | None         # the sampled token; None on an end event without a new token (stop token, max_tokens=0)
    text: str                    # newly released text ("" while held back)
    logprob: float | None = None                 # raw-distribution log-prob of token_id (of stop_token_id on a stop-token end)
    top_logprobs: list[tuple[int, float]] | None = None   # top alternatives (id, log-prob), best first
    finish_reason: str | None = None             # "stop" | "length" on the last event of a sample
    stop_token_id: int | None = None             # the stop token that ended the sample (not part of it)


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)   # generated tokens (a matched stop token excluded)
    logprobs: list[float] | None = None                  # one per token_ids entry, when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str = "length"
    prompt_tokens: int = 0
    stop_token_id: int | None = None                     # the stop token that ended it, if any


class Cancelled(Exception):
    """The request was cancelled while waiting for its turn."""


class SingleFlight:
    """A fair (FIFO) lock: waiters are served in arrival order; waiting can be cancelled."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._busy = False

    def acquire(self, cancel: threading.Event | None = None) -> None:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._busy or self._queue[0] is not ticket:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled()
                    self._cond.wait(timeout=0.1)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._busy = True

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)


class TextStream:
    """Bytes of one sample's tokens -> text released safely: whole characters, no possible stop-string start."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in stop if s]
        self.text = ""
        self.released = 0
        self.stopped = False

    def _find_stop(self, search_from: int) -> int:
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else -1

    def _holdback(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add token bytes; return the newly releasable text. Sets `stopped` when a stop string matched."""
        before = len(self.text)
        self.text += self.decoder.decode(data, final=final)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            cut = self._find_stop(max(0, before - longest + 1))
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._holdback()
        out = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return out

    def finish(self) -> str:
        return self.feed(b"", final=True)


def _grow_cache(cache, new_len: int) -> None:
    """Give a KV cache more slots (keeps what is filled); used so short answers never allocate the whole context."""
    if new_len <= cache.max_len:
        return
    for store in (cache.k, cache.v):
        for i, t in enumerate(store):
            bigger = t.new_zeros(t.shape[0], t.shape[1], new_len, t.shape[3])
            bigger[:, :, :cache.pos] = t[:, :, :cache.pos]
            store[i] = bigger
    cache.max_len = new_len


async def aiterate(iterator, cancel: threading.Event | None = None):
    """Iterate a blocking generator (engine events, stream_text) in a thread, yielding on the event loop.

    When the consumer stops (client gone, task cancelled), `cancel` is set and the generator closed,
    which frees the engine's single-flight slot at the next decode step.
    """
    import asyncio
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = cancel or threading.Event()

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is gone (server shutting down)

    def work():
        try:
            for item in iterator:
                put(("item", item))
                if cancel.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - re-raised on the loop side
            put(("error", e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            put(("end", None))

    threading.Thread(target=work, daemon=True, name="engine-stream").start()
    try:
        while True:
            kind, item = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        cancel.set()


class Engine:
    def __init__(self, spec, model, enc, guard: SingleFlight | None = None, quant: str | None = None,
                 blocks: dict | None = None, packed: dict | None = None, kernel=None):
        self.spec = spec
        self.model = model.eval()
        self.enc = enc
        self.guard = guard or SingleFlight()
        # the per-token forward used while decoding (quant/blocks: see backend/decode_step.py)
        self.step = DecodeStep(self.model, quant, blocks, packed, kernel)
        self.context_length = min(int(getattr(spec, "context_length", 0) or model.cfg.max_seq_len), model.cfg.max_seq_len)
        self._token_bytes: dict[int, bytes] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- tokens ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids. Special-token text (e.g. <|im_start|>) becomes the special token: raw control."""
        return self.enc.encode(text, allowed_special="all")

    def token_bytes(self, token_id: int) -> bytes:
        b = self._token_bytes.get(token_id)
        if b is None:
            try:
                b = self.enc.decode_single_token_bytes(token_id)
            except KeyError:  # an id the model has but the tokenizer does not (padded vocab)
                b = b""
            self._token_bytes[token_id] = b
        return b

    def token_str(self, token_id: int) -> str:
        """A token as text; a token that is not valid UTF-8 on its own is shown as `bytes:\\xNN...`."""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)

    def default_stop_ids(self) -> list[int]:
        try:
            from models.chat_format import stop_token_ids
            return list(stop_token_ids(self.enc))
        except ImportError:
            return [i for i in (self.enc.eot_token,) if i is not None]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        from models.chat_format import render_chat
        if not getattr(self.spec, "chat_format", None):
            raise ValueError(f"model {self.name!r} is a base model without a chat format; complete text instead")
        return list(render_chat(messages, self.enc, add_generation_prompt=True).ids)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len == 0:
            raise ValueError("prompt is empty")
        if prompt_len >= self.context_length:
            raise ValueError(f"prompt of {prompt_len} tokens does not fit the context length {self.context_length}")
        if prompt_len + max_tokens > self.context_length:
            raise ValueError(f"max_tokens {max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                             f"context length {self.context_length}")

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Stream events for len(prompts) * n samples. Waits its turn at the single-flight guard."""
        params.validate()
        if not prompts or n < 1:
            raise ValueError("need at least one prompt and n >= 1")
        for p in prompts:
            self.check_fits(len(p), params.max_tokens)
            if min(p) < 0 or max(p) >= self.model.cfg.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size})")
        return self._generate(prompts, params, n, cancel)

    def _generate(self, prompts, params, n, cancel) -> Iterator[TokenEvent]:
        try:
            self.guard.acquire(cancel)
        except Cancelled:
            return
        try:
            with torch.inference_mode():
                yield from self._decode(prompts, params, n, cancel)
        finally:
            self.guard.release()

    def _prefill(self, prompts: list[list[int]], n: int, capacity: int):
        model, dev = self.model, self.device
        if len(prompts) == 1:
            cache = model.new_cache(1, capacity)
            logits = model(torch.tensor([prompts[0]], device=dev), cache, last_only=True)[:, -1]
            if n > 1:  # one prefill shared by the n samples
                cache = cache.expand(n)
                logits = logits.expand(n, -1)
            return cache, logits
        L = max(len(p) for p in prompts)
        pad = torch.tensor([L - len(p) for p in prompts], device=dev)
        idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=dev)
        cache = model.new_cache(len(prompts), capacity, pad=pad)
        logits = model(idx, cache, last_only=True)[:, -1]
        if pad.max() == 0:
            cache.pad = None  # equal lengths: no mask needed while decoding
        if n > 1:
            rows = torch.arange(len(prompts), device=dev).repeat_interleave(n)
            cache.select(rows)
            logits = logits.index_select(0, rows)
        return cache, logits

    def _decode(self, prompts, params: SamplingParams, n: int, cancel) -> Iterator[TokenEvent]:
        rows = len(prompts) * n
        if params.max_tokens == 0:
            for i in range(rows):
                yield TokenEvent(i, None, "", finish_reason="length")
            return
        L = max(len(p) for p in prompts)
        full = L + params.max_tokens - 1  # the last token needs no forward pass
        cache, logits = self._prefill(prompts, n, min(full, L + 128))
        gen = make_generator(params.seed, self.device)
        stop_ids = set(params.stop_token_ids)
        streams = [TextStream(params.stop) for _ in range(rows)]
        active = list(range(rows))  # cache row -> sample index
        generated: list[list[int]] = [[] for _ in range(rows)]
        constraints = [params.constraint() for _ in range(rows)] if params.constraint else None
        k = params.logprobs
        for step in range(params.max_tokens):
            if cancel is not None and cancel.is_set():
                return
            shaped = apply_penalties(logits, [generated[i] for i in active], params)
            if constraints is not None:
                shaped = shaped.float().clone() if shaped is logits else shaped
                for r, idx in enumerate(active):
                    constraints[idx].mask(shaped[r])
            tokens = sample(shaped, params, gen)
            if k is not None:
                chosen, top_v, top_i = token_logprobs(logits, tokens, k)
                chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
            last = step == params.max_tokens - 1
            keep = []
            for r, (idx, tok) in enumerate(zip(active, tokens.tolist())):
                lp = chosen[r] if k is not None else None
                top = list(zip(top_i[r], top_v[r])) if k is not None else None
                st = streams[idx]
                if constraints is not None:
                    constraints[idx].accept(tok)
                if tok in stop_ids:  # its log-prob is reported too (clients score the end of a text by it)
                    yield TokenEvent(idx, None, st.finish(), lp, top, finish_reason="stop", stop_token_id=tok)
                    continue
                generated[idx].append(tok)
                text = st.feed(self.token_bytes(tok))
                if st.stopped:
                    yield TokenEvent(idx, tok, text, lp, top, "stop")
                elif last:
                    yield TokenEvent(idx, tok, text + st.finish(), lp, top, "length")
                else:
                    yield TokenEvent(idx, tok, text, lp, top)
                    keep.append(r)
            if not keep or last:
                return
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=self.device)
                cache.select(sel)
                tokens = tokens.index_select(0, sel)
                active = [active[r] for r in keep]
            if cache.pos + 1 > cache.max_len:
                _grow_cache(cache, min(full, 2 * cache.max_len))
            logits = self.step(tokens, cache)

    # -- whole answers ---------------------------------------------------------------------------
    def collect(self, events: Iterator[TokenEvent], rows: int, prompt_tokens: list[int],
                want_logprobs: bool) -> list[Completion]:
        out = [Completion(i, "", prompt_tokens=prompt_tokens[i]) for i in range(rows)]
        if want_logprobs:
            for c in out:
                c.logprobs, c.top_logprobs = [], []
        for ev in events:
            c = out[ev.index]
            c.text += ev.text
            if ev.token_id is not None:
                c.token_ids.append(ev.token_id)
                if want_logprobs:
                    c.logprobs.append(ev.logprob)
                    c.top_logprobs.append(ev.top_logprobs or [])
            if ev.finish_reason:
                c.finish_reason = ev.finish_reason
                c.stop_token_id = ev.stop_token_id
        return out

    def complete_batch(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                       cancel: threading.Event | None = None) -> list[Completion]:
        events = self.generate(prompts, params, n, cancel)
        lens = [len(p) for p in prompts for _ in range(n)]
        return self.collect(events, len(prompts) * n, lens, params.logprobs is not None)

    def complete(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
                 cancel: threading.Event | None = None) -> list[Completion]:
        return self.complete_batch([prompt_ids], params, n, cancel)

    def chat(self, messages: list[dict], params: SamplingParams, n: int = 1,
             cancel: threading.Event | None = None) -> list[Completion]:
        if not params.stop_token_ids:
            params = replace(params, stop_token_ids=self.default_stop_ids())
        return self.complete(self.chat_prompt(messages), params, n, cancel)

    def stream_text(self, prompt: str, params: SamplingParams, chat: bool = False,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """The growing answer text for one prompt (a user message when chat=True): what a UI shows."""
        if chat:
            ids = self.chat_prompt([{"role": "user", "content": prompt}])
        else:
            ids = self.encode(prompt) or [self.enc.eot_token]
        params = replace(params, stop_token_ids=params.stop_token_ids or self.default_stop_ids(),
                         max_tokens=min(params.max_tokens, max(0, self.context_length - len(ids))))
        text = ""
        for ev in self.generate([ids], params, 1, cancel):
            if ev.text:
                text += ev.text
                yield text
        yield text

    def prompt_logprobs(self, prompt_ids: list[int], k: int = 0) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Raw log-prob of each prompt token given the ones before it (the first has none), with top-k."""
        self.check_fits(len(prompt_ids), 0)
        self.guard.acquire()
        try:
            with torch.inference_mode():
                logits = self.model(torch.tensor([prompt_ids], device=self.device))[0, :-1]
                chosen, top_v, top_i = token_logprobs(logits, torch.tensor(prompt_ids[1:], device=self.device), k)
        finally:
            self.guard.release()
        out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        for c, tv, ti in zip(chosen.tolist(), top_v.tolist(), top_i.tolist()):
            out.append((c, list(zip(ti, tv))))
        return out
