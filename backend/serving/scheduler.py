"""Continuous batching: one Scheduler per loaded model owns its decode loop, as vLLM's engine core does.

Every door (the /v1 API, the tabs, tool loops, candidate generation) calls `Engine.generate`, which
submits a Request here and streams that request's events from its own queue. The pool's compute thread
(backend/serving/compute_thread.py) runs the loop, one iteration of each model's scheduler in turn:

  1. admit: waiting requests join in arrival order (FIFO, no overtaking) while the batch has room for
     their rows (`max_batch`; a bigger request runs once the batch is empty). More than `max_queued`
     requests that will have to wait (the batch has no room for them): `QueueFull` at submit time, which
     the API answers 503 with Retry-After;
  2. prefill: each admitted prompt is prefilled alone (batch 1), whole blocks of `block` tokens a forward;
     while other rows are decoding at most `prefill_budget` prompt tokens are computed per iteration, so a
     long prompt never stalls the streams already running. Leading blocks found in the prefix cache are
     copied in instead of computed (system prompts, few-shot headers, the history of a multi-turn chat),
     and give bitwise the keys and values a cold prefill computes;
  3. join: when all of a request's prompts are prefilled, its first tokens are sampled and its rows
     (n per prompt) join the running batch;
  4. decode: one step (backend.serving.decode_step.DecodeStep) for every row of the batch; each request then
     samples its own rows with its own generator, penalties, constraint and stop rules.

Rows share one left-padded KV cache (BatchCache): row r's tokens fill slots [pad[r], pos). A row that
leaves is swapped with the last row; a prompt longer than `pos` shifts the others right; when every
row has left-over padding the cache is shifted left again. Attention masks the padding away, and RoPE
positions are slot - pad, so a row computes what it would compute alone. With our 4-bit kernel every
row's dot products are exact integers and its attention loop starts at its own first slot, so a
request's tokens are bitwise the same alone or in any batch (tests/test_scheduler.py checks it).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from backend.serving.compute_thread import ComputeThread, shared_compute
from backend.serving.sampling import SamplingParams, apply_penalties, make_generator, sample, token_logprobs
from models.transformer import kv_slot_width

log = logging.getLogger(__name__)


# the KV caches a fused 4-bit engine keeps (Engine.kv_dtype): the model's own (float32), half the bytes
# (float16) or about a quarter (int8: llama.cpp's q8_0, backend/serving/kv_quant.py)
KV_CACHE_DTYPES = ("auto", "float16", "int8")


@dataclass
class ServeConfig:
    """How a scheduler shares its model (app.py exposes these as --max-batch, --max-queued, ...)."""
    max_batch: int = 32          # rows decoding together
    max_queued: int = 64         # requests waiting to be admitted; more -> QueueFull (503)
    prefill_budget: int = 256    # prompt tokens prefilled per iteration while other rows decode
    block: int = 64              # prefill chunk and prefix-cache granularity (tokens): see Scheduler._prefill_some
    prefix_cache_mb: int = 64    # memory bound of the prefix cache (0 = off)
    retry_after: int = 2         # seconds suggested to a client refused for a full queue
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: "float16" / "int8" for the fused 4-bit layer (Engine.kv_dtype)
    prefill_weights: str = "auto"  # "auto" | "bf16" | "q4": what a 4-bit model prefills on (engine.py AUTO_PREFILL)
    kernel_activations: str = "int16"  # "int16" | "int8": how our 4-bit kernel rounds inputs (q4_kernel.ACTIVATION_DIGITS)


class QueueFull(RuntimeError):
    """Too many requests are waiting; `retry_after` seconds is a fair guess at when to retry."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting for this model; retry in {retry_after} s")
        self.retry_after = retry_after


# -- the prefix cache -------------------------------------------------------------------------------
class PrefixCache:
    """KV blocks of earlier prompts, keyed by their whole token prefix (chained hashes, verified), LRU
    under a byte bound. A hit copies whole blocks into a new prompt's cache; the block that holds the
    prompt's last token is always computed, since its logits are needed."""

    def __init__(self, block: int, max_bytes: int):
        self.block, self.max_bytes = block, max_bytes
        self.entries: OrderedDict[int, tuple[tuple[int, ...], int, list, list]] = OrderedDict()
        self.bytes = 0
        self.hits = self.lookups = 0  # in blocks

    def _keys(self, ids: list[int], n_blocks: int):
        key = 0
        for b in range(n_blocks):
            toks = tuple(ids[b * self.block:(b + 1) * self.block])
            key = hash((key, toks))
            yield key, toks

    def lookup(self, ids: list[int]) -> list[tuple[list, list]]:
        """The cached (k, v) layer lists of the longest run of leading whole blocks, excluding the last token's."""
        found, parent = [], 0
        usable = (len(ids) - 1) // self.block
        self.lookups += usable
        for key, toks in self._keys(ids, usable):
            e = self.entries.get(key)
            if e is None or e[0] != toks or e[1] != parent:
                break
            self.entries.move_to_end(key)
            found.append((e[2], e[3]))
            parent = key
        self.hits += len(found)
        return found

    def clear(self) -> None:
        """Forget every block (the model's weights changed: backend/serving/weight_push.py)."""
        self.entries.clear()
        self.bytes = 0

    def store(self, ids: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keep the whole blocks of a prefilled prompt: k, v are its cache's layers [1, K, S, hd]."""
        if self.max_bytes <= 0:
            return
        parent = 0
        for b, (key, toks) in enumerate(self._keys(ids, len(ids) // self.block)):
            if key not in self.entries:
                sl = slice(b * self.block, (b + 1) * self.block)
                ks = [t[:, :, sl].clone() for t in k]
                vs = [t[:, :, sl].clone() for t in v]
                self.entries[key] = (toks, parent, ks, vs)
                self.bytes += sum(t.numel() * t.element_size() for t in ks + vs)
            self.entries.move_to_end(key)
            parent = key
        while self.bytes > self.max_bytes and self.entries:
            _, (_, _, ks, vs) = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in ks + vs)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


# -- the batch's KV cache ---------------------------------------------------------------------------
class BatchCache:
    """One left-padded KV cache for every decoding row: layers of [rows_capacity, K, slots, hd], of which
    rows [0, B) are live. `view()` is the KVCache-shaped object the decode step reads and advances."""

    def __init__(self, model, max_rows: int, dtype: torch.dtype):
        self.model, self.max_rows, self.dtype = model, max_rows, dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.B = 0
        self.pos = 0
        self.pads: list[int] = []
        self._view = None

    @property
    def slots(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def _realloc(self, rows: int, slots: int) -> None:
        cfg, m = self.model.cfg, self.model
        dtype = self.dtype
        shape = (rows, cfg.n_kv_heads, slots, kv_slot_width(cfg.head_dim, dtype))
        for store in (self.k, self.v):
            for i in range(cfg.n_layers):
                t = torch.zeros(shape, device=m.device, dtype=dtype)
                if i < len(store):
                    t[:self.B, :, :self.pos] = store[i][:self.B, :, :self.pos]
                    store[i] = t
                else:
                    store.append(t)
        self._view = None

    def _ensure(self, rows: int, slots: int) -> None:
        """Room for `rows` rows and `slots` slots. Rows start at those needed (a lone request of one sample holds
        one row, not `max_batch` nor a guess: on SmolLM2 a row of 1,000 float32 slots is 46 MB) and grow by
        doubling, capped by max_rows; slots grow by doubling, capped by the context length."""
        cap_rows, cap_slots = self.capacity, self.slots
        if rows <= cap_rows and slots <= cap_slots:
            return
        max_slots = self.model.cfg.max_seq_len
        new_rows = max(rows, min(self.max_rows, 2 * cap_rows)) if rows > cap_rows else cap_rows
        new_slots = max(slots, min(max_slots, max(64, 2 * cap_slots))) if slots > cap_slots else cap_slots
        self._realloc(new_rows, new_slots)

    def _shift(self, d: int) -> None:
        """Move every live row's slots by d (right if d > 0, left if < 0); pads follow."""
        if d == 0:
            return
        B, pos = self.B, self.pos
        for store in (self.k, self.v):
            for t in store:
                if d > 0:
                    t[:B, :, d:pos + d] = t[:B, :, :pos].clone()
                else:
                    t[:B, :, :pos + d] = t[:B, :, -d:pos].clone()
        self.pos += d
        self.pads = [p + d for p in self.pads]
        self._view = None

    def add(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int, n: int) -> list[int]:
        """Append n rows holding a prefilled prompt's cache (layers [1, K, >= length, hd]); their row indices."""
        if self.B == 0:
            self.pos, self.pads = 0, []
        if length > self.pos:
            self._ensure(self.B + n, length + 1)
            self._shift(length - self.pos)
        else:
            self._ensure(self.B + n, self.pos + 1)
        pad, rows = self.pos - length, list(range(self.B, self.B + n))
        for dst, src in ((self.k, k), (self.v, v)):
            for t, s in zip(dst, src):
                t[self.B:self.B + n, :, pad:self.pos] = s[:, :, :length]
        self.B += n
        self.pads += [pad] * n
        self._view = None
        return rows

    def remove(self, r: int) -> int | None:
        """Drop row r by moving the last row into its place; returns the moved row's old index (or None)."""
        last = self.B - 1
        moved = None
        if r != last:
            for store in (self.k, self.v):
                for t in store:
                    t[r, :, :self.pos] = t[last, :, :self.pos]
            self.pads[r] = self.pads[last]
            moved = last
        self.pads.pop()
        self.B -= 1
        self._view = None
        if self.B == 0:  # idle: give the memory back
            self.k, self.v, self.pos, self.pads = [], [], 0, []
        return moved

    def prepare_step(self, trim_at: int = 64) -> None:
        """Before a decode step: drop shared left padding when worthwhile, and make room for one more slot."""
        slack = min(self.pads)
        if slack and (slack >= trim_at or self.pos + 1 > self.slots):
            self._shift(-slack)
        if self.pos + 1 > self.slots:
            self._ensure(self.B, self.pos + 1)

    def view(self):
        """A KVCache for the live rows (views into the storage, so the step's writes land in it)."""
        if self._view is None:
            from models.transformer import KVCache
            c = object.__new__(KVCache)
            c.k = [t[:self.B] for t in self.k]
            c.v = [t[:self.B] for t in self.v]
            c.max_len = self.slots
            c.pad = None if not any(self.pads) else torch.tensor(self.pads, device=self.model.device)
            self._view = c
        self._view.pos = self.pos
        return self._view

    def advanced(self) -> None:
        """The step wrote one slot for every row."""
        self.pos += 1

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# -- requests ---------------------------------------------------------------------------------------
class Request:
    """One call of Engine.generate: len(prompts) * n samples with one set of sampling parameters."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, n: int, cancel: threading.Event | None,
                 device, text_stream):
        self.prompts, self.params, self.n = prompts, params, n
        self.user_cancel = cancel              # the caller's event: read, never set here
        self.closed = threading.Event()        # the caller's stream was closed (done or hung up)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.gen = make_generator(params.seed, device)
        self.rows = len(prompts) * n
        self.streams = [text_stream(params.stop) for _ in range(self.rows)]
        self.generated: list[list[int]] = [[] for _ in range(self.rows)]
        self.constraints = [params.constraint() for _ in range(self.rows)] if params.constraint else None
        self.stop_ids = set(params.stop_token_ids)
        self.prefilled: list = [None] * len(prompts)   # per prompt: (k, v, length, last logits) when done
        self.next_prompt = 0                            # the prompt being prefilled
        self.cursor = 0                                 # tokens of it in its cache so far
        self.cache = None                               # its batch-1 cache while prefilling
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.closed.is_set() or (self.user_cancel is not None and self.user_cancel.is_set())

    @property
    def done_prefill(self) -> bool:
        return self.next_prompt == len(self.prompts)

    def put(self, item) -> None:
        self.events.put(item)


_END = object()
class EventStream:
    """An iterator over one request's events. close() (or dropping it) cancels the request, also when it
    was never iterated (a generator's finally would not run then)."""

    def __init__(self, scheduler: "Scheduler", req: Request):
        self.scheduler, self.req = scheduler, req

    def __iter__(self):
        return self

    def __next__(self):
        req = self.req
        if req.cancelled:
            raise StopIteration
        while True:
            try:
                item = req.events.get(timeout=0.5)
                break
            except queue.Empty:
                if req.cancelled:
                    raise StopIteration from None
        if item is _END or req.cancelled:  # cancelled: nothing after the step it was seen at
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        if not self.req.closed.is_set():
            self.req.closed.set()
            self.scheduler.wake()

    def __del__(self):
        self.close()


class Scheduler:
    """Owns one engine's model while it serves: see the module docstring."""

    def __init__(self, engine, cfg: ServeConfig | None = None, compute: ComputeThread | None = None):
        self.engine = engine
        self.cfg = cfg or ServeConfig()
        # the thread that runs this loop, shared by the process's models (backend/serving/compute_thread.py)
        self.compute = compute or shared_compute()
        self.model = engine.model
        self.kv_dtype = engine.kv_dtype  # float16 for the fused 4-bit layer (decode_layer.cpp)
        self.batch = BatchCache(self.model, self.cfg.max_batch, self.kv_dtype)
        self.rows: list[tuple[Request, int]] = []       # batch row -> (request, sample index)
        self.next_tokens: list[int] = []                # batch row -> token to feed at the next step
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.prefix = PrefixCache(self.cfg.block, self.cfg.prefix_cache_mb << 20)
        self.live: dict[int, Request] = {}              # admitted and not yet ended
        self._cond = self.compute.cond
        self._closed = False
        self._gone = threading.Event()                  # closed and its requests failed
        self.steps = 0
        self.compute.add(self)

    # -- the doors' side -------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int,
               cancel: threading.Event | None, text_stream) -> Request:
        req = Request(prompts, params, n, cancel, self.model.device, text_stream)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.engine.name!r} was unloaded")
            # the queue limit counts requests that will have to wait: a burst that fits the batch's free rows
            # is admitted at the next iteration, however fast it came (prefilling ones count a row each here)
            rows_ahead = self.batch.B + len(self.prefilling) + sum(r.rows for r in self.waiting)
            if len(self.waiting) >= self.cfg.max_queued and rows_ahead + req.rows > self.cfg.max_batch:
                raise QueueFull(len(self.waiting), self.cfg.retry_after)
            self.waiting.append(req)
            self._cond.notify()
        return req

    def events(self, req: Request) -> "EventStream":
        """The request's events, as the loop produces them; closing the stream cancels the request."""
        return EventStream(self, req)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def call(self, fn):
        """Run fn() in the loop's thread between two steps (exclusive use of the model); its result."""
        return self.compute.call(fn)

    def close(self, wait: float = 0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if wait:
            self._gone.wait(wait)

    def stats(self) -> dict:
        return {"running": len({id(r) for r, _ in self.rows}), "rows": self.batch.B, "waiting": len(self.waiting),
                "prefilling": len(self.prefilling), "prefill_weights": self.engine.prefill_weights,
                "kv_cache_mb": round(self.batch.bytes / 2**20, 1),
                "prefix_cache_mb": round(self.prefix.bytes / 2**20, 1), "prefix_cache_hits": self.prefix.hits,
                "prefix_cache_lookups": self.prefix.lookups, "steps": self.steps,
                **self.compute.stats()}

    # -- the loop (run by the compute thread) --------------------------------------------------------
    def has_work(self) -> bool:  # holding self._cond
        return bool(self._closed or self.waiting or self.prefilling or self.rows)

    def run_once(self) -> bool:
        """One iteration; True once the scheduler is closed (its requests were failed)."""
        if self._closed:
            self._fail_all(RuntimeError(f"model {self.engine.name!r} was unloaded"))
            self._gone.set()
            return True
        try:
            with torch.inference_mode():
                self._iteration()
        except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, not the server
            log.exception("scheduler step failed for %s", self.engine.name)
            self._fail_all(e)
        return False

    def _end(self, req: Request) -> None:
        self.live.pop(id(req), None)
        req.put(_END)

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            reqs = list(self.live.values()) + list(self.waiting)
            self.waiting.clear()
        for r in reqs:
            r.put(err)
        self.live.clear()
        self.rows, self.next_tokens = [], []
        self.batch = BatchCache(self.model, self.cfg.max_batch, self.kv_dtype)
        self.prefilling.clear()

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self.rows:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.prefilling if r.cancelled]:
            self.prefilling.remove(r)
            self._end(r)
        with self._cond:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._end(r)
        gone = {id(r): r for r, _ in self.rows if r.cancelled}
        if gone:
            for b in reversed(range(len(self.rows))):
                if id(self.rows[b][0]) in gone:
                    self._remove_row(b)
            for r in gone.values():
                self._end(r)

    def _admit(self) -> None:
        with self._cond:
            while self.waiting:
                req = self.waiting[0]
                rows = self.batch.B + sum(r.rows for r in self.prefilling)
                if rows and rows + req.rows > self.cfg.max_batch:
                    break
                self.waiting.popleft()
                self.live[id(req)] = req
                if req.params.max_tokens == 0:  # nothing to generate: no prefill either
                    for i in range(req.rows):
                        req.put(self.engine.event(i, None, "", finish_reason="length"))
                    self._end(req)
                    continue
                self.prefilling.append(req)

    def _prefill(self) -> None:
        """Spend the prefill budget on admitted requests in order; whole when nothing else is decoding."""
        budget = self.cfg.prefill_budget if self.rows else None
        while self.prefilling and (budget is None or budget > 0):
            req = self.prefilling[0]
            spent = self._prefill_some(req, budget)
            if budget is not None:
                budget -= spent
            if req.done_prefill:
                self.prefilling.popleft()
                self._join(req)
                if budget is None and self.rows:
                    budget = 0  # stream the joined rows before the next newcomer's prefill
            elif budget is not None and spent == 0:
                break

    def _prefill_some(self, req: Request, budget: int | None) -> int:
        """Prefill up to `budget` tokens (None: all) of req's current prompt(s); the tokens computed."""
        spent = 0
        engine, model = self.engine, self.model
        while not req.done_prefill and (budget is None or spent < budget):
            ids = req.prompts[req.next_prompt]
            if req.cache is None:
                req.cache = engine.new_cache(1, len(ids))
                found = self.prefix.lookup(ids)
                for b, (ks, vs) in enumerate(found):
                    sl = slice(b * self.cfg.block, (b + 1) * self.cfg.block)
                    for t, s in zip(req.cache.k, ks):
                        t[:, :, sl] = s
                    for t, s in zip(req.cache.v, vs):
                        t[:, :, sl] = s
                req.cursor = req.cache.pos = len(found) * self.cfg.block
            # On the 4-bit engine's q4 prefill (Prefill.path, TILE_ROWS) a row's result does not depend on how the
            # prompt is cut, so a chunk takes all the budget allows, the weights read once for all its rows.
            # Elsewhere chunks end on the block grid, and the prompt's last partial block is a forward of its own:
            # a block's keys and values then come out bitwise the same whether computed here or copied from the
            # prefix cache. Where a prefill row does not depend on the chunk's other rows (the bf16 path), a chunk
            # takes every whole block the budget allows; on the float path (other GEMM kernels for other row
            # counts) one block.
            block = self.cfg.block
            limit = len(ids) if budget is None else min(len(ids), req.cursor + budget - spent)
            end = min(len(ids), (req.cursor // block + 1) * block)  # the next block, or the prompt's tail
            if engine.prefill_any_cut:
                end = limit
            elif end % block == 0:  # whole blocks: all the budget allows, where that changes no bit
                more = limit // block * block
                if more > end and engine.prefill_path(more - req.cursor) == engine.prefill_path(block) != "float":
                    end = more
            take = end - req.cursor
            chunk = ids[req.cursor:end]
            hidden = engine.prefill_hidden(chunk, req.cache)
            req.cursor += take
            spent += take
            if req.cursor == len(ids):
                logits = engine.head(hidden[:, -1]).float()  # [1, V]
                self.prefix.store(ids, req.cache.k, req.cache.v)
                req.prefilled[req.next_prompt] = (req.cache.k, req.cache.v, len(ids), logits)
                req.next_prompt += 1
                req.cache = None
        return spent

    def _join(self, req: Request) -> None:
        """Sample the request's first tokens; the rows that go on join the batch."""
        logits = torch.cat([p[3].expand(req.n, -1) for p in req.prefilled])
        req.first_token_at = time.perf_counter()
        going = self._advance(req, list(range(req.rows)), logits)
        by_prompt: dict[int, list[tuple[int, int]]] = {}
        for idx, tok in going:
            by_prompt.setdefault(idx // req.n, []).append((idx, tok))
        for j, items in by_prompt.items():
            k, v, length, _ = req.prefilled[j]
            rows = self.batch.add(k, v, length, len(items))
            for row, (idx, tok) in zip(rows, items):
                assert row == len(self.rows)
                self.rows.append((req, idx))
                self.next_tokens.append(tok)
        req.prefilled = [None] * len(req.prompts)
        if not going:
            self._end(req)

    def _decode_step(self) -> None:
        self.batch.prepare_step()
        cache = self.batch.view()
        tokens = torch.tensor(self.next_tokens, device=self.model.device)
        logits = self.engine.step(tokens, cache).float()
        self.batch.advanced()
        self.steps += 1
        groups: dict[int, tuple[Request, list[int], list[int]]] = {}
        for b, (req, idx) in enumerate(self.rows):
            g = groups.setdefault(id(req), (req, [], []))
            g[1].append(idx)
            g[2].append(b)
        finished: list[int] = []
        for req, idxs, bs in groups.values():
            order = sorted(range(len(idxs)), key=idxs.__getitem__)  # a request samples its rows in index order
            idxs, bs = [idxs[i] for i in order], [bs[i] for i in order]
            going = dict(self._advance(req, idxs, logits[bs]))
            for idx, b in zip(idxs, bs):
                if idx in going:
                    self.next_tokens[b] = going[idx]
                else:
                    finished.append(b)
            if not going:
                self._end(req)
        for b in sorted(finished, reverse=True):
            self._remove_row(b)

    def _remove_row(self, b: int) -> None:
        moved = self.batch.remove(b)
        if moved is not None:
            self.rows[b], self.next_tokens[b] = self.rows[moved], self.next_tokens[moved]
        self.rows.pop()
        self.next_tokens.pop()

    def _advance(self, req: Request, idxs: list[int], logits: torch.Tensor) -> list[tuple[int, int]]:
        """Sample the next token of req's rows idxs (in index order) from their logits [len, V], emit the
        events; the (index, token) pairs of rows that go on."""
        p, engine = req.params, self.engine
        shaped = apply_penalties(logits, [req.generated[i] for i in idxs], p)
        if req.constraints is not None:
            shaped = shaped.clone() if shaped is logits else shaped
            for r, i in enumerate(idxs):
                req.constraints[i].mask(shaped[r])
        tokens = sample(shaped, p, req.gen)
        k = p.logprobs
        if k is not None:
            chosen, top_v, top_i = token_logprobs(logits, tokens, k)
            chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
        going = []
        for r, (idx, tok) in enumerate(zip(idxs, tokens.tolist())):
            lp = chosen[r] if k is not None else None
            top = list(zip(top_i[r], top_v[r])) if k is not None else None
            st = req.streams[idx]
            if req.constraints is not None:
                req.constraints[idx].accept(tok)
            if tok in req.stop_ids:  # its log-prob is reported too (clients score the end of a text by it)
                req.put(engine.event(idx, None, st.finish(), lp, top, finish_reason="stop", stop_token_id=tok))
                continue
            req.generated[idx].append(tok)
            text = st.feed(engine.token_bytes(tok))
            if st.stopped:
                req.put(engine.event(idx, tok, text, lp, top, "stop"))
            elif len(req.generated[idx]) >= p.max_tokens:
                req.put(engine.event(idx, tok, text + st.finish(), lp, top, "length"))
            else:
                req.put(engine.event(idx, tok, text, lp, top))
                going.append((idx, tok))
        return going

