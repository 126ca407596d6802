"""The serving room: everything between a request and its tokens.

    engine.py         Engine: one loaded model's generate/score API (KV cache, log-probs, tool-call interception)
    scheduler.py      continuous batching: one decode loop per model, requests join and leave at each step
    decode_step.py    the per-token forward (float, torch int4, or our kernel's one-C++-call-per-layer)
    q4_kernel.py/.cpp our block-quantized matmul over the GGUF's own blocks (AVX512-VNNI, or AVX2 through avx2_shim.h); decode_layer.cpp
    sampling.py       the one sampling function (temperature, top-p/k, penalties, seeds)
    structured.py     constrained decoding (llguidance): JSON schemas and forced tool calls
    model_pool.py     EnginePool: load, share and evict engines by registry name
    remote_engine.py  a remote OpenAI-compatible server behind the same Engine interface
"""
