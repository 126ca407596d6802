"""Swap new weights into a served model: what a trainer pushes after each optimizer step so that the
server it samples rollouts from serves the current policy (TRL's vLLM server mode does the same with
`update_named_param` over NCCL and then `reset_prefix_cache`; here the weights come over HTTP as one
safetensors file, which needs no process group between the two machines).

    swap_weights(engine, body)   # body: safetensors bytes, one tensor per model.named_parameters() name

Everything is checked before any weight changes (names, shapes, floating dtype, finite values), so a
refused push leaves the served model as it was. The copy itself runs on the engine's scheduler thread
(Scheduler.call): no step is half-way through the old weights while they change. The prefix cache is
dropped with them (its keys and values came from the old weights); requests already decoding go on with
the new weights from their next token, as in vLLM.

The pushed weights live in the loaded engine only: the registry's files stay as they are, so unloading
the model (or restarting the server) serves the registered weights again.
"""
from __future__ import annotations

import torch


class WeightsRefused(ValueError):
    """The pushed file does not fit the served model (HTTP 422)."""


class CannotSwap(ValueError):
    """The model is served in a way that pushed float weights cannot reach (HTTP 409)."""


def parse_weights(body: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    if not body:
        raise WeightsRefused("the body is empty: send the weights as a safetensors file")
    try:
        return load(body)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a malformed header
        raise WeightsRefused(f"the body is not a safetensors file: {e}") from None


def check_weights(params: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    """Refuse (WeightsRefused naming the first problem) unless `new` has exactly the model's parameter
    names, each with its shape, floating and finite."""
    missing = [k for k in params if k not in new]
    unknown = [k for k in new if k not in params]
    if missing or unknown:
        parts = ([f"missing {len(missing)} ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})"] if missing else []) + \
                ([f"unknown {len(unknown)} ({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''})"] if unknown else [])
        raise WeightsRefused("the tensors' names are not the model's parameters: " + "; ".join(parts))
    for k, p in params.items():
        t = new[k]
        if tuple(t.shape) != tuple(p.shape):
            raise WeightsRefused(f"{k}: shape {list(t.shape)}, the served model's is {list(p.shape)}")
        if not t.is_floating_point():
            raise WeightsRefused(f"{k}: dtype {t.dtype} is not a floating type")
        if not torch.isfinite(t).all():
            raise WeightsRefused(f"{k}: has NaN or infinite values")


def swap_weights(engine, body: bytes) -> dict:
    """Check `body` against the engine's model, then copy it in between two scheduler steps.
    Returns {"model", "tensors", "version"}; version counts the pushes this engine took."""
    step = getattr(engine, "step", None)
    if step is None:  # a RemoteEngine: its weights are on another server
        raise CannotSwap(f"model {engine.name!r} is served by another server; push its weights there")
    if step.quant is not None:
        raise CannotSwap(f"model {engine.name!r} decodes from {step.quant} copies of its weights, which pushed float "
                         "weights would not reach; serve it with PLAYGROUND_QUANT=none to take pushed weights")
    params = dict(engine.model.named_parameters())
    new = parse_weights(body)
    check_weights(params, new)

    def copy_in() -> int:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(new[k].to(device=p.device, dtype=p.dtype))
        engine.scheduler.prefix.clear()
        engine.weights_version = getattr(engine, "weights_version", 0) + 1
        return engine.weights_version

    version = engine.scheduler.call(copy_in)
    return {"model": engine.name, "tensors": len(params), "version": version}
