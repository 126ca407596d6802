"""python -m backend.bench NAME [options]: run one benchmark; its last line is one JSON object."""
from __future__ import annotations

import sys
from importlib import import_module

from backend.runtime import apply_runtime_env

apply_runtime_env()  # the app's OMP settings, before any benchmark imports torch (backend/runtime.py)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m backend.bench NAME [options]   (NAME: serve, decode, bpe, labels, pretrain, train, chat, tool_sft, grpo, hardening)")
    name = sys.argv[1]
    try:
        module = import_module(f"backend.bench.{name}")
    except ModuleNotFoundError:
        sys.exit(f"no benchmark named {name!r}")
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
