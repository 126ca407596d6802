"""GRPO/RLHF rollouts from a serving engine instead of the trainer's own sampler (TRL's
`use_vllm=True, vllm_mode="server"`): the trainer asks the server for the G samples of each prompt and
recomputes every log-prob itself, as it does for its own samples.

Config fields (PolicyConfig; all empty: the in-process sampler, the default):
    rollout_server       the server's OpenAI base URL, as add-remote takes it: http://host:port/v1
                         (another instance of this app, vLLM, SGLang, llama.cpp's server, TGI)
    rollout_model        the name the server serves the policy under (its /v1/models id)
    rollout_api_key_env  the environment variable holding the server's API key (for this app: an admin's,
                         which pushing weights needs)
    weight_sync          "push": the trainer sends the policy's float weights to the server before the first
                         rollouts and after each optimizer step (POST {origin}/api/models/{rollout_model}/weights,
                         one safetensors file; this app's route, backend/serving/weight_push.py), so every
                         rollout comes from the current policy. "none": rollouts only (a foreign server
                         such as vLLM, whose weight updates need its own NCCL group): the samples come from
                         whatever the server serves, and every step says it was off-policy.

Samples come from /v1/completions (the chat prompt sent as its token ids; n samples per prompt, seed,
temperature) with logprobs=0, so each sampled token comes back as the server's token, which names the
exact id here: the server must use the policy's tokenizer. An unreachable server, a model it does not serve or a
missing key fails the run before the parent model is loaded.
"""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from urllib.parse import quote, urlparse

import httpx

from backend.serving.remote_engine import RemoteEngine, RemoteError, _error_message, check_remote

WEIGHT_SYNC = ("push", "none")


def check_rollout_fields(cfg) -> None:
    """The rollout fields of a PolicyConfig, checked without touching the network."""
    if cfg.weight_sync not in WEIGHT_SYNC:
        raise ValueError(f"weight_sync: 'push' or 'none', not {cfg.weight_sync!r}")
    if not cfg.rollout_server:
        if cfg.rollout_model or cfg.rollout_api_key_env:
            raise ValueError("rollout_server: rollout_model and rollout_api_key_env need the server's base URL "
                             "(http://host:port/v1)")
        return
    url = urlparse(cfg.rollout_server)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"rollout_server: an http(s) base URL such as http://host:8000/v1, not {cfg.rollout_server!r}")
    if not cfg.rollout_model:
        raise ValueError("rollout_model: name the model the rollout server serves the policy under")
    if cfg.weight_sync == "push" and not cfg.rollout_server.rstrip("/").endswith("/v1"):
        raise ValueError(f"rollout_server: weight_sync 'push' needs this app's /v1 base URL (…/v1), not "
                         f"{cfg.rollout_server!r}; for a foreign server set weight_sync to 'none'")
    if cfg.rollout_api_key_env and not cfg.rollout_api_key_env.isidentifier():
        raise ValueError(f"rollout_api_key_env: the name of an environment variable, not {cfg.rollout_api_key_env!r}")


class RolloutEngine(RemoteEngine):
    """The remote engine, exact to the token: the prompt goes as its token ids (the completions API takes a
    list of ids; this app and vLLM do), not as text the server would tokenize again, and logprobs=0 makes
    each sampled token come back as the server's token, whose id here is exact."""

    def complete_batch(self, prompts, params, n=1, cancel=None):
        params = dataclasses.replace(params, logprobs=0) if params.logprobs is None else params
        return RemoteEngine.complete_batch(self, prompts, params, n, cancel)

    def _body(self, prompt, params, n):
        path, body = RemoteEngine._body(self, prompt, params, n)
        body["prompt"] = [int(t) for t in prompt]
        return path, body


class RolloutServer:
    def __init__(self, cfg, enc, tokenizer: str):
        """Reach the server first (RemoteError naming the URL when it cannot be reached or does not serve
        rollout_model; ValueError when the API key's variable is not set)."""
        self.base_url = cfg.rollout_server.rstrip("/")
        self.model = cfg.rollout_model
        self.sync = cfg.weight_sync
        key_env = cfg.rollout_api_key_env or None
        self.key = os.environ.get(key_env) if key_env else None
        if key_env and not self.key:
            raise ValueError(f"rollout_api_key_env: ${key_env} is not set (the rollout server's API key)")
        try:
            card = check_remote(self.base_url, self.model, self.key)
        except RemoteError as e:
            raise RemoteError(f"rollout_server: {e}") from None
        ctx = card.get("max_model_len")
        spec = SimpleNamespace(kind="remote", name=f"{self.model} at {self.base_url}", tokenizer=tokenizer,
                               context_length=ctx if isinstance(ctx, int) else 4096,
                               remote={"base_url": self.base_url, "model": self.model, "api_key_env": key_env})
        self.engine = RolloutEngine(spec, enc)
        self.weights_url = f"{self.base_url.removesuffix('/v1')}/api/models/{quote(self.model, safe='')}/weights"
        self.pushes = 0

    def describe(self) -> str:
        how = ("its weights pushed from the policy before every step" if self.sync == "push"
               else "weights NOT synced: off-policy samples from whatever the server serves")
        return f"rollouts from {self.model!r} at {self.base_url} ({how})"

    def push(self, model) -> dict:
        """Send `model`'s parameters (float32, by model.named_parameters() name) to the server, which swaps
        them in before answering; its reply {model, tensors, version}."""
        body = weights_file(model)
        headers = {"Content-Type": "application/octet-stream",
                   **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        try:
            resp = httpx.post(self.weights_url, content=body, headers=headers,
                              timeout=httpx.Timeout(600.0, connect=10.0))
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot push weights to {self.weights_url}: {type(e).__name__}: {e}") from e
        if resp.status_code >= 400:
            raise RemoteError(f"pushing weights to {self.weights_url}: {resp.status_code} {_error_message(resp)}")
        self.pushes += 1
        return resp.json()

    def close(self) -> None:
        self.engine.http.close()


def weights_file(model) -> bytes:
    """What `push` sends: the parameters as float32, one tensor per model.named_parameters() name (a tied
    embedding once) in a safetensors file."""
    from safetensors.torch import save
    return save({k: p.detach().float().cpu().contiguous() for k, p in model.named_parameters()})
