"""Where derived caches live (the dequantized bundled model, converted tokenizers).

Default: <data_dir>/cache. $PLAYGROUND_CACHE_DIR lets several data dirs share one (the test suite
does, so the bundled model is dequantized once per machine, not once per test).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir_for(data_dir: Path | str) -> Path:
    env = os.environ.get("PLAYGROUND_CACHE_DIR")
    return Path(env).resolve() if env else Path(data_dir).resolve() / "cache"
