"""The chat's tools: a full-text search index (search.py) and a Python sandbox (sandbox.py).

    from backend.tools import run_python, SandboxLimits, PythonTool, SearchIndex, format_results
    run_python("print(2 + 2)", SandboxLimits(wall_s=5)).as_text()   # "4"
    pg.sandbox.run(code) -> SandboxResult      # the Playground's PythonTool (default limits, 2 at a time)
    pg.search.search_tool(query, k) -> {"results", "source", "note"}; format_results(results) -> str
"""
from backend.tools.sandbox import (PythonTool, SandboxBusy, SandboxLimits, SandboxResult, SandboxUnavailable,
                                   isolation, run_python)
from backend.tools.search import SearchIndex, WebSearchUnavailable, format_results

__all__ = ["PythonTool", "SandboxBusy", "SandboxLimits", "SandboxResult", "SandboxUnavailable", "isolation",
           "run_python", "SearchIndex", "WebSearchUnavailable", "format_results"]
