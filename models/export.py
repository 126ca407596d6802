"""Export a registered model for the engines the field runs: a Hugging Face directory or a GGUF file.

- hf: config.json + model.safetensors + tokenizer.json/tokenizer_config.json (ModelRegistry.export)
  + generation_config.json whose eos_token_id lists the end-of-turn token, so transformers' `generate`
  (and vLLM) stop at <|im_end|> instead of running past it.
- gguf: one llama-architecture GGUF file (float32 tensors; q/k rows permuted as llama.cpp's
  convert_hf_to_gguf.py does) with the byte-level BPE tokenizer and the chat template in its metadata.
  models/gguf_loader.py reads it back (the inverse permutation), as it reads the bundled SmolLM2.
- push_to_hub: upload the export with huggingface_hub (a clear HubUnavailable offline).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.hf_checkpoint import HubUnavailable
from models.hf_tokenizer import CHATML_TEMPLATE, bytes_to_unicode, tokenizer_json

FORMATS = ("hf", "gguf")


def pre_tokenizer(enc) -> str:
    """llama.cpp names the pre-tokenizer (its split regex) instead of storing it: the name for ours.
    cl100k's regex is Llama 3's ("llama-bpe"); SmolLM2's is "smollm"; any other falls back to "default"."""
    from models.tokenizers import SMOLLM2_PAT_STR, get_encoding
    if enc._pat_str == get_encoding("cl100k_base")._pat_str:
        return "llama-bpe"
    return "smollm" if enc._pat_str == SMOLLM2_PAT_STR else "default"


def export_dest(cfg, name: str, fmt: str) -> Path:
    """Where the REST door writes an export: <data dir>/exports/<name>-<format>-<time>[.gguf]."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return cfg.data_dir / "exports" / (f"{name}-{stamp}.gguf" if fmt == "gguf" else f"{name}-hf-{stamp}")


def end_token_ids(enc, chat_format: str | None, vocab_size: int) -> list[int]:
    """The ids that end a reply: <|im_end|> first for chat models, then <|endoftext|>."""
    names = (["<|im_end|>"] if chat_format == "chatml" else []) + ["<|endoftext|>"]
    return [enc._special_tokens[t] for t in names if enc._special_tokens.get(t, vocab_size) < vocab_size]


def export_model(registry, name: str, dest: str | Path, fmt: str = "hf", push_to_hub: str | None = None) -> dict:
    """Write `name` to `dest` (which must not exist) and optionally push it; {"path", "format", "url"}."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    spec = registry.get(name)
    if spec.kind == "remote":
        raise ValueError(f"model {name!r} is served by {spec.remote['base_url']}: there are no weights to export")
    dest = Path(dest)
    if fmt == "gguf" and dest.suffix != ".gguf":
        dest = dest / f"{name}.gguf"
    if dest.exists():
        raise ValueError(f"export destination {dest} already exists")
    if push_to_hub is not None:
        _check_repo_id(push_to_hub)
    path = export_hf(registry, name, dest) if fmt == "hf" else export_gguf(registry, name, dest)
    out = {"name": name, "format": fmt, "path": str(path)}
    if push_to_hub:
        out["url"] = push(path, push_to_hub)
    return out


# -- Hugging Face directory ----------------------------------------------------------------------
def export_hf(registry, name: str, dest: Path) -> Path:
    from models.tokenizers import get_encoding
    spec = registry.get(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        d = registry.export(name, tmp / "model")  # weights, config, tokenizer files
        config = json.loads((d / "config.json").read_text())
        enc = get_encoding(spec.tokenizer, registry.cfg.data_dir)
        ends = end_token_ids(enc, spec.chat_format, config["vocab_size"])
        gen = {"_from_model_config": False, "eos_token_id": ends, "do_sample": True, "temperature": 1.0}
        if "<|endoftext|>" in enc._special_tokens and enc._special_tokens["<|endoftext|>"] < config["vocab_size"]:
            gen["pad_token_id"] = enc._special_tokens["<|endoftext|>"]
        if ends:  # vLLM and older transformers read the config's eos too
            config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
            (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        os.replace(d, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- GGUF ----------------------------------------------------------------------------------------
def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF rotate-half q/k rows -> llama.cpp's interleaved RoPE rows
    (models.gguf_loader.unpermute is its inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    from models.gguf_loader import _GLOBAL_NAMES, _LAYER_NAMES
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    parts = hf.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"]:
        i = int(parts[2])
        for g, h in _LAYER_NAMES.items():
            if h.format(i=i) == hf:
                return f"blk.{i}.{g}"
    raise ValueError(f"tensor {hf!r} has no llama.cpp name")


def gguf_vocab(enc, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for tokenizer.ggml.*: one entry per model id, byte-level strings."""
    import gguf
    b2u = bytes_to_unicode()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, rank in enc._mergeable_ranks.items():
        if rank < vocab_size:
            tokens[rank] = "".join(b2u[b] for b in tok)
            types[rank] = gguf.TokenType.NORMAL
    for tok, i in enc._special_tokens.items():
        if i < vocab_size:
            tokens[i], types[i] = tok, gguf.TokenType.CONTROL
    merges = tokenizer_json(enc, vocab_size)["model"]["merges"]
    return tokens, [int(t) for t in types], merges


def export_gguf(registry, name: str, dest: Path) -> Path:
    import gguf

    from models.hf_checkpoint import load_hf_dir
    from models.tokenizers import get_encoding
    spec = registry.get(name)
    if spec.kind == "bundled":
        model = registry.load(name, device="cpu", dtype=torch.float32)
    else:
        _, model = load_hf_dir(spec.path)
    cfg = model.cfg
    enc = get_encoding(spec.tokenizer, registry.cfg.data_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_description(spec.description or name)
        w.add_context_length(spec.context_length)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        tokens, types, merges = gguf_vocab(enc, cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer(enc))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
        ends = end_token_ids(enc, spec.chat_format, cfg.vocab_size)
        if ends:
            w.add_eos_token_id(ends[0])
            w.add_eot_token_id(ends[0])
        if "<|endoftext|>" in enc._special_tokens and enc._special_tokens["<|endoftext|>"] < cfg.vocab_size:
            w.add_pad_token_id(enc._special_tokens["<|endoftext|>"])
            w.add_bos_token_id(enc._special_tokens["<|endoftext|>"])
        if spec.chat_format == "chatml":
            w.add_chat_template(CHATML_TEMPLATE)
        for k, v in model.state_dict().items():
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: llama.cpp reuses token_embd when output.weight is absent
            a = v.detach().to("cpu", torch.float32).numpy()
            if k.endswith("q_proj.weight"):
                a = permute(a, cfg.n_heads)
            elif k.endswith("k_proj.weight"):
                a = permute(a, cfg.n_kv_heads)
            w.add_tensor(gguf_name(k), np.ascontiguousarray(a))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


# -- the hub -------------------------------------------------------------------------------------
def _check_repo_id(repo: str) -> None:
    import re
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo):
        raise ValueError(f"push_to_hub must be a Hugging Face repo id like 'user/my-model', not {repo!r}")


def push(path: Path, repo: str) -> str:
    """Upload an export (a directory or one GGUF file) to `repo` with the token huggingface_hub finds
    (HF_TOKEN or `hf auth login`). Raises HubUnavailable offline or when the hub refuses."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        if path.is_dir():
            api.upload_folder(repo_id=repo, folder_path=str(path), commit_message="export from llm-playground")
        else:
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo,
                                   commit_message="export from llm-playground")
    except HfHubHTTPError as e:
        raise HubUnavailable(f"the Hugging Face Hub refused the upload to {repo!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the HTTP client's connection errors, a missing token (OSError)
        raise HubUnavailable(f"cannot push to the Hugging Face Hub repo {repo!r} (offline or not logged in?): "
                             f"{type(e).__name__}: {e}") from e
    return f"https://huggingface.co/{repo}"
