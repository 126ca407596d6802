"""LoRA (Hu et al. 2021): train low-rank adapters beside the frozen attention and MLP linears.

    lora = add_lora(model, rank=8, alpha=16)   # model's weights frozen; lora holds the trainable A, B
    ... optimise lora.parameters() ...
    merged = merged_copy(model)                # W + (alpha / rank) * B @ A folded in: a plain Transformer

Each adapted nn.Linear y = x W^T gets y += (alpha / rank) * (x A^T) B^T through a forward hook, so the
model's parameter names (and its HF-layout checkpoints) do not change. B starts at zero: step 0 is the
parent exactly. The embedding stays trainable when train_embeddings (new special tokens need rows).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.scale = 1.0
        self.hooks = []
        self.extra = nn.ParameterList()  # other trainable parameters (the embedding)


def add_lora(model, rank: int, alpha: float = 16.0, seed: int = 0, train_embeddings: bool = True) -> LoRA:
    if rank < 1:
        raise ValueError("lora_rank must be at least 1")
    g = torch.Generator().manual_seed(seed)
    lora = LoRA()
    lora.scale = alpha / rank
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            key = name.replace(".", "_")
            a = torch.empty(rank, mod.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)  # as nn.Linear; B = 0
            lora.A[key] = nn.Parameter(a.to(mod.weight.device))
            lora.B[key] = nn.Parameter(torch.zeros(mod.out_features, rank, device=mod.weight.device))
            mod._lora = (lora, key)
            lora.hooks.append(mod.register_forward_hook(_hook))
    if train_embeddings:
        emb = model.model.embed_tokens.weight
        emb.requires_grad_(True)
        lora.extra.append(emb)
    return lora


def _hook(mod, inputs, out):
    lora, key = mod._lora
    x = inputs[0]
    return out + (x @ lora.A[key].to(x.dtype).T @ lora.B[key].to(x.dtype).T) * lora.scale


@torch.no_grad()
def merged_copy(model):
    """A plain Transformer with every adapter folded into its weight (the model to register)."""
    from models.transformer import Transformer
    out = Transformer(model.cfg).to(model.device)
    out.load_state_dict(model.state_dict())
    for name, mod in model.named_modules():
        if hasattr(mod, "_lora"):
            lora, key = mod._lora
            target = out.get_submodule(name)
            target.weight += (lora.B[key] @ lora.A[key]) * lora.scale
    return out.train(model.training)
