"""Model sizes for training from scratch. Every preset is the same Transformer class, only smaller.

The vocabulary size is not part of a preset: it comes from the tokenizer the run uses
(`preset_config(name, vocab_size)`). For small models the tokenizer matters a lot: with cl100k_base
(100k tokens) the embedding matrix and the output layer dwarf everything else, so the CPU presets
are meant for a small BPE trained in the app on the corpus (a few thousand tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from models.transformer import ModelConfig


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    # Training defaults that suit the size (the trainer's config may override each one).
    seq_len: int
    batch_size: int
    lr: float
    description: str
    # Vocabulary of the BPE trained on the corpus when the run's tokenizer is "auto".
    bpe_vocab_size: int = 4096


PRESETS: dict[str, Preset] = {
    # For tests: trains in milliseconds per step.
    "tiny": Preset(ModelConfig(vocab_size=0, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                               max_seq_len=256, rope_theta=10000.0),
                   seq_len=32, batch_size=8, lr=1e-2, description="2 layers, dim 32: for tests", bpe_vocab_size=512),
    # This 2-core CPU: clear progress in about 5 minutes. Measured on python-docs, 1 thread of a shared
    # machine: 349 steps in 300 s, loss 6.93 -> 3.41, held-out bits/byte 3.36 -> 1.79; samples go from byte
    # soup to docs-like fragments ("the "except" clause", "__format__(self, other"). 600 steps: loss 2.77.
    "cpu-5min": Preset(ModelConfig(vocab_size=0, dim=128, n_layers=3, n_heads=4, n_kv_heads=4, hidden_dim=320,
                                   max_seq_len=1024, rope_theta=10000.0),
                       seq_len=128, batch_size=16, lr=5e-3, bpe_vocab_size=1024,
                       description="3 layers, dim 128, BPE 1024 (~0.7M params): ~5 minutes on 2 CPU cores"),
    # A longer CPU run (about an hour) or a quick GPU run.
    "cpu-1h": Preset(ModelConfig(vocab_size=0, dim=256, n_layers=6, n_heads=4, n_kv_heads=4, hidden_dim=768,
                                 max_seq_len=1024, rope_theta=10000.0),
                     seq_len=256, batch_size=16, lr=2e-3,
                     description="6 layers, dim 256 (~4.7M params + embeddings): about an hour on a CPU"),
    # GPU sizes (GPT-2 small-ish and the SmolLM2-135M shape).
    "gpu-d12": Preset(ModelConfig(vocab_size=0, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                                  max_seq_len=2048, rope_theta=10000.0),
                      seq_len=1024, batch_size=32, lr=6e-4, bpe_vocab_size=32768,
                      description="12 layers, dim 768 (GPT-2 small size, ~85M params + embeddings): one GPU"),
    "gpu-smollm2-135m": Preset(ModelConfig(vocab_size=0, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                           hidden_dim=1536, max_seq_len=2048, rope_theta=100000.0),
                               seq_len=2048, batch_size=16, lr=3e-3, bpe_vocab_size=32768,
                               description="the SmolLM2-135M shape (30 layers, dim 576, GQA 9/3): GPUs"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, vocab_size: int) -> ModelConfig:
    """The preset's ModelConfig with the tokenizer's vocabulary size filled in."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return replace(get_preset(name).model, vocab_size=vocab_size)
