"""Hugging Face Llama-style checkpoint directories: load them into our Transformer, save ours the same way.

Layout: `config.json` (LlamaForCausalLM) + `model.safetensors` (or shards with
`model.safetensors.index.json`). Our Transformer already uses HF weight names, so no renaming is
needed. Saved directories also carry `playground.json` (our own metadata: tokenizer, chat format,
lineage), which other tools ignore; transformers, vLLM and llama.cpp's convert_hf_to_gguf.py read
the rest as an ordinary Llama checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.transformer import ModelConfig, Transformer

PLAYGROUND_FILE = "playground.json"
# model_type values whose checkpoints are plain Llama blocks (no biases, no sliding window).
_LLAMA_TYPES = {"llama"}


class HubUnavailable(ValueError):
    """A hub model id could not be fetched (offline, unknown repo, gated)."""


# -- config ------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for LlamaForCausalLM. Writes `rope_theta` (older transformers/vLLM) and
    `rope_parameters` (transformers 5) so either reads it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from an HF config.json dict; refuses features our Transformer does not implement."""
    mt = d.get("model_type")
    if mt not in _LLAMA_TYPES:
        raise ValueError(f"model_type {mt!r} is not supported (only Llama-architecture checkpoints)")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    if (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")) or \
            rope.get("rope_type", "default") != "default":
        raise ValueError("checkpoints with RoPE scaling are not supported")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("checkpoints with attention or MLP biases are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    n_heads = d["num_attention_heads"]
    if d.get("head_dim") not in (None, d["hidden_size"] // n_heads):
        raise ValueError(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads is not supported")
    return ModelConfig(
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        hidden_dim=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


# -- save --------------------------------------------------------------------------------------
def save_hf_dir(model: Transformer, path: Path, extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ playground.json with `extra`) into `path`.

    Tied embeddings are stored once (as model.embed_tokens.weight), as transformers does.
    Callers that need atomicity write to a temp dir and rename it (see ModelRegistry.register).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "model.safetensors").chmod(0o644)  # safetensors creates it 0600
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg, model.dtype), indent=2) + "\n")
    (path / PLAYGROUND_FILE).write_text(json.dumps(extra or {}, indent=2, default=str) + "\n")
    return path


# -- load --------------------------------------------------------------------------------------
def read_extra(path: Path) -> dict:
    """Our playground.json beside a checkpoint ({} when absent, e.g. a checkpoint from the hub)."""
    f = Path(path) / PLAYGROUND_FILE
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(path / shard)))
        return sd
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_hf_dir(path: Path) -> tuple[ModelConfig, Transformer]:
    """Load a Llama-style HF checkpoint directory. Weights keep their stored dtype; eval mode."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    sd = read_state_dict(path)
    # HF checkpoints may carry non-persistent extras (e.g. rotary inv_freq in old saves).
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    model = Transformer.from_state_dict(cfg, sd)
    return cfg, model.eval()


def download_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a hub checkpoint (config + safetensors only) into the HF cache and return its directory.

    Offline, or for an unknown/gated repo, raises HubUnavailable naming the id.
    """
    import huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        local = huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json",
                            "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise HubUnavailable(f"hub model {repo_id!r} is not available: {type(e).__name__}") from e
    except LocalEntryNotFoundError as e:
        raise HubUnavailable(f"cannot download hub model {repo_id!r}: the Hugging Face Hub is not reachable "
                             "(offline) and the model is not in the local HF cache") from e
    except (OSError, ValueError) as e:  # HTTP/connection errors are OSError subclasses
        raise HubUnavailable(f"cannot download hub model {repo_id!r}: {e}") from e
    return Path(local)


def load_hf(source: str | Path, revision: str | None = None) -> tuple[ModelConfig, Transformer]:
    """A local checkpoint directory, or a hub id like 'HuggingFaceTB/SmolLM2-135M' fetched when online."""
    p = Path(source)
    if p.is_dir():
        return load_hf_dir(p)
    return load_hf_dir(download_hub_model(str(source), revision))
