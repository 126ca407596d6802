"""Manage the registry's models from a shell (the same services as /api/models and the Models panel).

    python -m backend.models list
    python -m backend.models add-remote NAME --base-url http://host:8000/v1 --model REMOTE_NAME \\
        [--api-key-env VAR] [--tokenizer ENC] [--chat-format chatml|none] [--context-length N] [--no-check]
    python -m backend.models remove NAME
    python -m backend.models export NAME DIR [--format hf|gguf] [--push-to-hub REPO]

Like `python -m backend.jobs`, it works on the data directory directly: it is for whoever runs the server.
"""
from __future__ import annotations

import argparse
import sys

from backend.config import AppConfig

# Which models each use offers (models.registry ROLES): a reward model scores and never generates.
USES = {"chat": ("chat",), "generate": ("chat", "base"), "reward": ("reward",), "any": ("chat", "base", "reward")}


def model_names(registry, use: str = "any") -> list[str]:
    """The registered models fit for `use` (a key of USES), read from the registry each call: every list of
    models (the tabs' dropdowns, /api, the arena's draw) comes from here, so a model a job registers while
    the app runs is offered at the next page load or tab switch."""
    return registry.names(USES[use])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backend.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every registered model")
    a = sub.add_parser("add-remote", help="register a model an OpenAI-compatible server serves")
    a.add_argument("name")
    a.add_argument("--base-url", required=True, help="the server's /v1 URL, e.g. http://127.0.0.1:8000/v1")
    a.add_argument("--model", dest="remote_model", required=True, help="the model's id on that server")
    a.add_argument("--api-key-env", default=None, help="environment variable holding the server's API key")
    a.add_argument("--tokenizer", default="cl100k_base", help="local encoding matching the server's tokenizer")
    a.add_argument("--chat-format", default="chatml", choices=["chatml", "none"],
                   help="'none' for a base model (completions only)")
    a.add_argument("--context-length", type=int, default=None,
                   help="default: the server's max_model_len when it reports one, else 4096")
    a.add_argument("--description", default="")
    a.add_argument("--no-check", dest="check", action="store_false", help="do not ask the server first")
    a.add_argument("--overwrite", action="store_true")
    r = sub.add_parser("remove", help="delete a registered model (a remote one: only its registration)")
    r.add_argument("name")
    e = sub.add_parser("export", help="write a model for other engines (transformers/vLLM, llama.cpp)")
    e.add_argument("name")
    e.add_argument("dir", help="destination (must not exist): a directory for hf, a .gguf file path or a directory for gguf")
    e.add_argument("--format", choices=["hf", "gguf"], default="hf")
    e.add_argument("--push-to-hub", metavar="REPO", default=None, help="then upload it to this Hugging Face repo")
    args = p.parse_args(argv)

    cfg = AppConfig(**({"data_dir": args.data_dir} if args.data_dir else {}))
    cfg.ensure_dirs()
    from models.registry import ModelRegistry
    registry = ModelRegistry(cfg)
    try:
        if args.action == "list":
            for s in registry.list():
                where = s.remote["base_url"] + " " + s.remote["model"] if s.remote else (str(s.path) if s.path else "")
                print(f"{s.name:32s} {s.kind:8s} {s.role:7s} ctx {s.context_length:6d}  {where}")
        elif args.action == "add-remote":
            from backend.serving.remote_engine import register_remote
            spec = register_remote(registry, args.name, args.base_url, args.remote_model, args.api_key_env,
                                   args.tokenizer, None if args.chat_format == "none" else args.chat_format,
                                   args.context_length, args.description, args.check, args.overwrite)
            print(f"registered {spec.name}: {spec.remote['model']} at {spec.remote['base_url']} "
                  f"(context {spec.context_length}, tokenizer {spec.tokenizer})")
        elif args.action == "remove":
            registry.delete(args.name)
            print(f"removed {args.name}")
        elif args.action == "export":
            from models.export import export_model
            out = export_model(registry, args.name, args.dir, args.format, args.push_to_hub)
            print(f"exported {args.name} ({args.format}) to {out['path']}" +
                  (f" and pushed to {out['url']}" if out.get("url") else ""))
    except (ValueError, LookupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from backend.runtime import exit_process
    exit_process(main())
