"""The inference engine: one model with its tokenizer, KV-cached sampling with streaming, stop handling
and log-probs, served by a continuous-batching scheduler (backend/serving/scheduler.py).

    engine = Engine(spec, model, enc)
    for ev in engine.generate([prompt_ids], SamplingParams(max_tokens=50), n=4):
        print(ev.index, repr(ev.text))          # streamed text of sample `index`

How a request runs:
- `generate` checks the request, then submits it to the engine's scheduler, which admits it into the
  running batch beside every other request for this model (whatever door it came from); its events come
  back on the request's own queue. N samples of one prompt share one prefill.
- Each step samples through backend.serving.sampling (temperature, top-k, top-p, penalties, a constraint, a
  per-request generator), so a request's tokens do not depend on who else is in the batch.
- Text is streamed UTF-8 safely (a character split across tokens is released only when complete) and
  stop strings may span tokens: text that could still become a stop string is held back, and a
  matched stop string is cut from the output. Stop tokens end a sample and are not part of it.
- A cancelled request (its `cancel` event set, or its generator closed) leaves the batch at the next step.
- Prefill (backend/serving/prefill.py; float32 residual stream, norms, RoPE and KV cache): a model decoding on
  the GGUF's 4-bit blocks prefills on the same blocks by default (AUTO_PREFILL: no float copy of the weights
  held, and a prompt's logits are bitwise the same however it is chunked), or with prefill_weights="bf16"
  (app.py --prefill-weights) long chunks on bf16 copies of its layer matrices, faster on CPUs with bf16 matrix
  units (AMX / avx512_bf16) for more memory; models trained here prefill on their float weights.
  `python -m backend.bench decode` measures its speed and logit distance.
"""
from __future__ import annotations

import codecs
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from backend.serving.decode_step import DecodeStep
from backend.serving.q4_kernel import ACTIVATION_DIGITS
from backend.serving.sampling import SamplingParams, token_logprobs
from backend.serving.compute_thread import ComputeThread
from backend.serving.scheduler import KV_CACHE_DTYPES, Scheduler, ServeConfig
from models.transformer import kv_slot_width

log = logging.getLogger(__name__)


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


async def aiterate(iterator, cancel: threading.Event | None = None):
    """Iterate a blocking generator (engine events, stream_text) in a thread, yielding on the event loop.

    When the consumer stops (client gone, task cancelled), `cancel` is set and the generator closed,
    which takes the request out of the scheduler's batch at its next step.
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


def release_file_pages(tensors) -> int:
    """Let the OS drop the resident pages of tensors that are views of a memory-mapped weights file
    (safetensors loads that way): they are clean, so the next read faults them back in from the file.
    Tensors in anonymous memory are left alone (dropping those would zero them). Returns bytes released."""
    import ctypes
    import mmap
    try:
        maps = []
        for line in open("/proc/self/maps"):
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi))
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in maps):
            continue
        a, b = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4) == 0:  # MADV_DONTNEED
            released += b - a
    return released


def bf16_matmul_fast() -> bool:
    """CPUs with bf16 matrix instructions (AMX tiles or avx512_bf16), where oneDNN's bf16 GEMM ran ~15x
    faster than float32 here (300x576x1536: 0.47 vs 7.8 ms); elsewhere bf16 would only cost precision."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


PREFILL_WEIGHTS = ("auto", "bf16", "q4")  # Engine(prefill_weights=...), app.py --prefill-weights
# What "auto" prefills a model decoding on the GGUF's 4-bit blocks with: the same blocks, so the engine holds no
# float copy of the layer matrices. The trade-off is memory against time to first token. Measured 2026-12-06 on
# this project's 2-core AMD EPYC (AVX2 only: the blocks run on torch's int4 kernel, not ours; a loaded machine,
# load average 7-8), scripts/measure_prefill_memory.py and scripts/measure_prefill_ttft.py:
#   idle RSS of app.py after loading SmolLM2 and serving one request: q4 609-623 MB (1 run each of 2),
#   bf16 831 MB, main before this change (float32 prefill) 1148 MB;
#   300-token TTFT through the engine, 5 interleaved runs, medians: q4 5.34 s, bf16 15.5 s (no bf16 matrix
#   units here), transformers bf16 forward 16.7 s; the float32 forward alone took ~2.0 s beside q4's 5.4 s.
# A previous measurement on an AMX/VNNI machine (our kernel) gave idle RSS 499 MB (q4) vs 728 (bf16) and
# TTFT 0.31 s (q4) vs 0.204 s (bf16; transformers bf16 0.133 s). The memory goal of issue 12 (<= 600 MB)
# wins; --prefill-weights bf16 buys the TTFT back on CPUs with bf16 matrix units.
AUTO_PREFILL = "q4"


def prefill_choice(asked: str, step) -> str:
    """The weights prefill runs on ("q4", "bf16" or "float", backend/serving/prefill.py) for a request of
    `asked` (PREFILL_WEIGHTS) and a decode step: the 4-bit choices only where decoding runs on the GGUF's
    blocks (our kernel or torch's int4 kernel), so that nothing else reads the float layer weights."""
    if asked not in PREFILL_WEIGHTS:
        raise ValueError(f"prefill_weights: one of {', '.join(PREFILL_WEIGHTS)}, not {asked!r}")
    if step.quant != "gguf" or step.model.device.type != "cpu":
        return "float"  # models trained here (and int8 / GPU engines): unchanged
    want = AUTO_PREFILL if asked == "auto" else asked
    if want == "bf16" and not bf16_matmul_fast():
        log.warning("bf16 prefill asked on a CPU without bf16 matrix units (AMX / avx512_bf16): it will be slow")
    return want


class Engine:
    def __init__(self, spec, model, enc, quant: str | None = None, blocks: dict | None = None,
                 packed: dict | None = None, kernel=None, serve: ServeConfig | None = None,
                 compute: ComputeThread | None = None, prefill_weights: str | None = None):
        """prefill_weights: "auto", "bf16" or "q4" (PREFILL_WEIGHTS; None: the ServeConfig's, default "auto"),
        for a model that decodes on the GGUF's 4-bit blocks; other models prefill on their float weights."""
        self.spec = spec
        self.model = model.eval()
        self.enc = enc
        # the per-token forward used while decoding (quant/blocks: see backend/serving/decode_step.py)
        acts = (serve or ServeConfig()).kernel_activations
        if acts not in ACTIVATION_DIGITS:
            raise ValueError(f"kernel_activations: one of {', '.join(ACTIVATION_DIGITS)}, not {acts!r}")
        self.step = DecodeStep(self.model, quant, blocks, packed, kernel, activations=acts)
        self.head = self.step.lm_head  # final-norm hidden states -> logits, the same for prefill and decode
        # the dtype of every KV cache this engine makes (new_cache): the model's, or float16 for the fused 4-bit
        # layer where ServeConfig.kv_cache_dtype asks (half the bytes a long context reads each step, as
        # llama.cpp's default f16 cache; measured on SmolLM2: decode at 1500 tokens 12.3 instead of 15.6 ms a
        # step on an AVX-512 machine, 146 instead of 110 tok/s on an AVX2 one, but greedy text parted from
        # float32's after 11-17 tokens on 3 of 5 prompts)
        # int8 (llama.cpp's q8_0, backend/serving/kv_quant.py) reads a quarter of float32's bytes
        kv = (serve or ServeConfig()).kv_cache_dtype
        if kv not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: one of {', '.join(KV_CACHE_DTYPES)}, not {kv!r}")
        fused = {"float16": torch.float16, "int8": torch.int8}.get(kv) if self.step.fused is not None else None
        if fused == torch.int8:
            try:
                kv_slot_width(model.cfg.head_dim, fused)
            except ValueError as e:
                log.warning("%s: %s; keeping %s", spec.name, e, model.dtype)
                fused = None
        self.kv_dtype = fused or self.model.dtype
        self.context_length = min(int(getattr(spec, "context_length", 0) or model.cfg.max_seq_len), model.cfg.max_seq_len)
        self._token_bytes: dict[int, bytes] = {}
        # prefill (backend/serving/prefill.py): "q4" (the decode step's 4-bit blocks), "bf16" (short chunks on the
        # 4-bit blocks, long ones on bf16 copies of the layer matrices) or "float" (the model's own forward: models
        # trained here, and the 4-bit model where our kernel cannot run); scoring (prompt_logprobs) keeps float32
        self.prefill_weights = prefill_choice(prefill_weights or (serve or ServeConfig()).prefill_weights, self.step)
        from backend.serving.prefill import Prefill
        self._prefill = Prefill(self.model, self.prefill_weights, self.step.layers if self.step.quant == "gguf" else None)
        if self.prefill_weights != "float":
            # the float32 weights now serve only exact scoring (prompt_logprobs, step mode): where they are a
            # mapped file, their pages need not stay resident meanwhile
            layers = self.model.model.layers
            release_file_pages([lin.weight for layer in layers for lin in (
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)] + [self.model.model.embed_tokens.weight])
        self.scheduler = Scheduler(self, serve, compute)

    event = TokenEvent  # what the scheduler emits

    def new_cache(self, batch: int, max_len: int) -> "KVCache":
        """A KV cache as the decode step wants it (float16 or int8 for the fused 4-bit layer: decode_layer.cpp)."""
        return self.model.new_cache(batch, max_len, dtype=self.kv_dtype)

    def prefill_path(self, tokens: int) -> str:
        """The weights a prefill chunk of this many tokens runs on (backend/serving/prefill.py Prefill.path)."""
        return self._prefill.path(tokens)

    @property
    def prefill_any_cut(self) -> bool:
        """Whether a prompt may be cut into prefill chunks anywhere without changing a bit (the q4 path's tiles)."""
        return self.prefill_weights == "q4"

    def prefill_hidden(self, ids: list[int], cache) -> torch.Tensor:
        """Continue `cache` (batch 1) with ids; the final-norm hidden states [1, len(ids), dim]."""
        return self._prefill(ids, cache)

    def close(self) -> None:
        """Stop serving (the pool unloaded this model): waiting and running requests get an error."""
        self.scheduler.close()

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
        """Stream events for len(prompts) * n samples. The request is checked and queued here (QueueFull
        when too many wait), so a caller can refuse it before streaming anything."""
        params.validate()
        if not prompts or n < 1:
            raise ValueError("need at least one prompt and n >= 1")
        for p in prompts:
            self.check_fits(len(p), params.max_tokens)
            if min(p) < 0 or max(p) >= self.model.cfg.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size})")
        req = self.scheduler.submit([list(p) for p in prompts], params, n, cancel, TextStream)
        return self.scheduler.events(req)

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

        def score():
            logits = self.model(torch.tensor([prompt_ids], device=self.device))[0, :-1]
            return token_logprobs(logits, torch.tensor(prompt_ids[1:], device=self.device), k)
        chosen, top_v, top_i = self.scheduler.call(score)
        out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        for c, tv, ti in zip(chosen.tolist(), top_v.tolist(), top_i.tolist()):
            out.append((c, list(zip(ti, tv))))
        return out

    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """The float model's logits [V] for the token after ids (the Generate tab's step mode), computed
        between two scheduler steps."""
        self.check_fits(len(ids), 0)
        return self.scheduler.call(
            lambda: self.model(torch.tensor([ids], device=self.device), last_only=True)[0, -1].float())
