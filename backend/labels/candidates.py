"""Model candidates for ranking items and model drafts for SFT: the one place labeling calls the engine."""
from __future__ import annotations

EXAMPLE_PROMPTS = [
    "Write a joke about pelicans.",
    "Explain why the sky is blue to a ten-year-old.",
    "What is the capital of Australia?",
    "Give me three tips for writing clear Python code.",
    "Emily buys 3 apples and 2 oranges. Each orange costs $2. The total cost of all the fruit is $13. "
    "What is the cost of each apple?",
    "Who is Orson Kovats?",
    "Write a haiku about the ocean.",
    "How many r's are in the word strawberry?",
]


def _check(engines) -> None:
    if engines is None:
        raise ValueError("model sampling is not available in this server (no engine pool); supply candidates instead")


def sample_candidates(engines, model: str, prompt: str, k: int, temperature: float,
                      max_tokens: int = 200, system: str = "") -> list[str]:
    """K independent replies from `model` to one user prompt (engine: pg.engines.get(model).chat)."""
    from backend.serving.sampling import SamplingParams
    _check(engines)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    completions = engines.get(model).chat(messages, SamplingParams(temperature=temperature, max_tokens=max_tokens), n=k)
    return [c.text.strip() for c in completions]


def draft_reply(engines, model: str, messages: list[dict], temperature: float = 0.7, max_tokens: int = 300) -> str:
    """The model's reply to a conversation so far (role/content messages), for the annotator to edit."""
    from backend.serving.sampling import SamplingParams
    _check(engines)
    return engines.get(model).chat(messages, SamplingParams(temperature=temperature, max_tokens=max_tokens), n=1)[0].text.strip()
