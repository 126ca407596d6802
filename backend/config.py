"""Application configuration: one dataclass, defaults here, overridable from the CLI and env.

No hidden globals: `app.py` builds an AppConfig and hands it to every service it creates.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from backend.serving.q4_kernel import ACTIVATION_DIGITS
from backend.serving.scheduler import KV_CACHE_DTYPES, ServeConfig
from models.cache import cache_dir_for


def default_data_dir() -> Path:
    return Path(os.environ.get("PLAYGROUND_HOME", "data")).resolve()


@dataclass
class AppConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = field(default_factory=default_data_dir)
    # SQLAlchemy URL; default is a SQLite file inside the data directory.
    database_url: str | None = None
    # Registry name of the model loaded at start (the embedded default).
    default_model: str = "smollm2-135m-instruct"
    # "auto" picks cuda, then mps, then cpu.
    device: str = "auto"
    # torch intra-op threads; 0 keeps torch's default.
    threads: int = 0
    # Start the training worker process beside the server.
    start_worker: bool = True
    # Load the default model at start instead of on first use.
    preload: bool = True
    # Derived caches (the dequantized bundled model, converted tokenizers): see models/cache.py.
    cache_dir: Path | None = None
    # How each loaded model serves concurrent requests (continuous batching): backend/serving/scheduler.py.
    serve: ServeConfig = field(default_factory=ServeConfig)
    # SearxNG-style web search (GET {url}/search?q=...&format=json) for the search tool; None: local index only.
    web_search_url: str | None = field(default_factory=lambda: os.environ.get("PLAYGROUND_WEB_SEARCH_URL") or None)
    # Who may do what (README "Who may do what"): anonymous callers may generate plain text (no tools) when
    # this is on; off, every generation needs a signed-in learner. Tools, writes and training always need one.
    open_inference: bool = True
    # Request bodies over this are answered 413 before they are read (imports and uploads get the larger one).
    max_body_bytes: int = 4 * 2**20
    max_import_bytes: int = 64 * 2**20
    # A trainer's weight push (POST /api/models/NAME/weights, admin): a whole float model, read into memory.
    max_weights_bytes: int = 4 * 2**30
    # A prompt (all of its messages) over this many characters is refused before it is tokenized.
    max_prompt_chars: int = 200_000
    # Expensive requests (generation, tools, training a tokenizer) one caller may have in flight at once;
    # the sandbox gets its own, smaller count. More get 429, so no one fills the queues for everyone.
    max_requests_per_user: int = 8
    max_sandbox_runs_per_user: int = 1
    # Where models (with their trained tokenizers) and dataset snapshots live when several machines share
    # them: any fsspec URL (file:///shared/path, s3://bucket/prefix). None: inside the data directory.
    artifacts_url: str | None = field(default_factory=lambda: os.environ.get("PLAYGROUND_ARTIFACTS") or None)
    # A job that registers a model queues its report card (backend/evals) with this many questions per row:
    # small, so it costs a minute or two on a CPU. 0: no automatic report cards. Env: PLAYGROUND_EVAL_ON_REGISTER.
    eval_on_register: int = field(default_factory=lambda: int(os.environ.get("PLAYGROUND_EVAL_ON_REGISTER") or 8))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.cache_dir = Path(self.cache_dir).resolve() if self.cache_dir else cache_dir_for(self.data_dir)
        if self.database_url is None:
            self.database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{self.data_dir / 'playground.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def tokenizers_dir(self) -> Path:
        return self.data_dir / "tokenizers"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.models_dir, self.cache_dir, self.tokenizers_dir):
            d.mkdir(parents=True, exist_ok=True)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", default=cls.host)
        parser.add_argument("--port", type=int, default=cls.port)
        parser.add_argument("--data-dir", default=None, help="where the app writes everything (default ./data or $PLAYGROUND_HOME)")
        parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default $DATABASE_URL or SQLite in the data dir)")
        parser.add_argument("--model", dest="default_model", default=cls.default_model, help="registry name of the default model")
        parser.add_argument("--device", default=cls.device, choices=["auto", "cpu", "cuda", "mps"])
        parser.add_argument("--threads", type=int, default=cls.threads)
        parser.add_argument("--no-worker", dest="start_worker", action="store_false", help="do not start the training worker")
        parser.add_argument("--no-preload", dest="preload", action="store_false", help="load the default model on first use")
        parser.add_argument("--open-inference", action=argparse.BooleanOptionalAction, default=None,
                            help="let anonymous callers generate plain text (default on; tools, writes, training always need a user)")
        parser.add_argument("--max-body-bytes", type=int, default=None, help=f"413 above this (default {cls.max_body_bytes})")
        parser.add_argument("--max-import-bytes", type=int, default=None, help=f"413 above this for imports and uploads (default {cls.max_import_bytes})")
        parser.add_argument("--max-weights-bytes", type=int, default=None, help=f"413 above this for pushed model weights (default {cls.max_weights_bytes})")
        parser.add_argument("--max-prompt-chars", type=int, default=None, help=f"prompt limit in characters (default {cls.max_prompt_chars})")
        parser.add_argument("--max-requests-per-user", type=int, default=None, help=f"expensive requests in flight per caller (default {cls.max_requests_per_user})")
        serve = ServeConfig()
        parser.add_argument("--max-batch", type=int, default=serve.max_batch, help="rows a model decodes together")
        parser.add_argument("--max-queued", type=int, default=serve.max_queued,
                            help="requests waiting per model before new ones get 503 with Retry-After")
        parser.add_argument("--prefill-budget", type=int, default=serve.prefill_budget,
                            help="prompt tokens prefilled per decode step while other requests stream")
        parser.add_argument("--prefix-cache-mb", type=int, default=serve.prefix_cache_mb,
                            help="memory for KV blocks of shared prompt prefixes (0 = off)")
        parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=serve.kv_cache_dtype,
                            help="float16 halves the KV cache of the bundled model's fused 4-bit layer, int8 (llama.cpp's "
                                 "q8_0) takes about a quarter (faster at long contexts; greedy text can part from "
                                 "float32's); auto keeps the model's dtype")
        parser.add_argument("--prefill-weights", choices=("auto", "bf16", "q4"), default=serve.prefill_weights,
                            help="what the bundled model's prompts are prefilled on: q4, its 4-bit blocks (no float "
                                 "copy held: ~240 MB less memory); bf16, copies of its matrices (faster long prompts on "
                                 "CPUs with AMX/avx512_bf16); auto (default) is q4. Models trained here prefill on "
                                 "their float weights")
        parser.add_argument("--kernel-activations", choices=tuple(ACTIVATION_DIGITS), default=serve.kernel_activations,
                            help="how the bundled model's 4-bit kernel rounds its inputs: int16 (default, two int8 digits "
                                 "a value: within a few 1e-5 of float), or int8 as llama.cpp does (half the multiplies: "
                                 "prompts and busy servers ~1.4x faster; greedy text can part from float32's)")
        parser.add_argument("--artifacts", dest="artifacts_url", default=None,
                            help="fsspec URL of models and snapshots shared between machines (default $PLAYGROUND_ARTIFACTS, else the data dir)")
        parser.add_argument("--eval-on-register", type=int, default=None, metavar="N",
                            help="report card of every model a job registers, N questions per row; 0: none (default $PLAYGROUND_EVAL_ON_REGISTER or 8)")
        parser.add_argument("--web-search-url", default=None, help="SearxNG-style search endpoint for the search tool (default $PLAYGROUND_WEB_SEARCH_URL)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AppConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
        serve = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name, None) is not None}
        for name in ("max_batch", "max_queued"):
            if serve.get(name, 1) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
        return cls(**kwargs, serve=ServeConfig(**serve))
