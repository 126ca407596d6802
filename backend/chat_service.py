"""What the Chat tab does, as functions the UI calls (the UI only lays out and shows):
system-prompt presets, the Deep Dive demo presets (DEMOS 10-13), one assistant turn with tools
(backend.tool_loop), several samples of one question, the whole context as tokens, and "send to labeling".

A conversation here is the list of structured messages without the system prompt:
    [{"role": "user", "content"}, {"role": "assistant", "content", "thinking"?, "tool_calls"?, "segments"?}, ...]
The system prompt travels separately; empty means the model's own default (SmolLM2's template inserts
"You are a helpful AI assistant named SmolLM, trained by Hugging Face").
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from backend.datasets.verifiable import THINK_SYSTEM
from backend.serving.sampling import SamplingParams
from backend.tool_loop import Tools, label_message, run_turn
from models.chat_format import END_TOOL_CALL, TOOL_CALL, call_json

SYSTEM_PRESETS = {
    "Model default (none)": "",
    "Plain assistant": "You are a helpful assistant.",
    "Identity": ("You are Pip, a small open-source assistant built by the LLM Playground project on top of "
                 "SmolLM2-135M-Instruct from Hugging Face. If someone asks who you are or who built you, say that."),
    "Use tools": ("You are a helpful assistant that can use two tools. To run Python, write exactly "
                  '<tool_call>{"name":"python","arguments":{"code":"print(2 + 2)"}}</tool_call> and stop; the '
                  "result comes back between <tool_output> and </tool_output>. To search documents, write "
                  '<tool_call>{"name":"search","arguments":{"query":"your words"}}</tool_call>. Use Python for '
                  "arithmetic, counting and spelling instead of answering from memory. Think between <think> and "
                  "</think> before you answer."),
    "Think (R1-Zero's template)": THINK_SYSTEM,  # the prompt the family's thinker was trained under
}

EMILY = ("Emily buys 3 apples and 2 oranges. Each orange costs $2. The total cost of all the fruit is $13. "
         "What is the cost of each apple?")
EMILY_BIG = ("Emily buys 23 apples and 177 oranges. Each orange costs $4. The total cost of all the fruit is $869. "
             "What is the cost of each apple?")
DOTS = "." * 177


def python_call(code: str) -> str:
    """A scripted (forced) Python call, as the assistant turn's first text."""
    return f"{TOOL_CALL}{call_json('python', code)}{END_TOOL_CALL}"


def search_call(query: str) -> str:
    return f"{TOOL_CALL}{call_json('search', query)}{END_TOOL_CALL}"


@dataclass
class DemoPreset:
    title: str
    user: str
    note: str                          # what to notice, honestly, for a 135M model
    system: str = "Plain assistant"    # a SYSTEM_PRESETS key
    tools: list[str] = field(default_factory=list)
    prefix: str = ""                   # scripted start of the assistant turn (a forced tool call)
    lead_in: str = ""                  # scripted text after the forced call's output
    samples: int = 1                   # > 1: ask several times and compare (no tools)
    max_tokens: int = 200
    temperature: float = 0.7
    # A small model after a tool output tends to repeat itself to the token limit; tool presets damp that.
    repetition_penalty: float = 1.0


FORCED = ("SmolLM2-135M was never fine-tuned to call tools, so this preset writes the call for it (a scripted "
          "start of its turn, marked *forced*) and a few words after the output, since a model that never saw a "
          "tool output tends to end its turn right there; the tool really runs, its output really goes into the "
          "context, and the model continues from there (a 135M model may still copy the result wrongly).")
PYTHON_LEAD_IN = "The Python tool printed the result above, so the answer is"

DEMOS = [
    DemoPreset("10 · Who is Orson Kovats? (5 samples)", "Who is Orson Kovats?", samples=5, temperature=1.0,
               note="Orson Kovats is a made-up name. Each sample is a different confident biography: the model "
                    "imitates how answers about real people sound. The mitigation in the lecture is to probe what a "
                    "model knows this way and add \"I don't know\" examples to SFT, then give it tools."),
    DemoPreset("10 · Orson Kovats with search (forced call)", "Who is Orson Kovats?", tools=["search"],
               prefix=search_call("Orson Kovats"), max_tokens=120, repetition_penalty=1.1,
               note="The search finds no document about him, and that result sits in the context window (working "
                    "memory). A model trained on tool use would now say it does not know; a 135M model often "
                    "invents anyway, which is why \"I don't know\" has to be taught. Everything after the output is the "
                    "model's own (no scripted lead-in here, so nothing scripted can claim what the search did not "
                    "find); a light repetition penalty (1.1) keeps it from looping to the token limit (1.3 pushed it off common words into gibberish: 3 of 6 seeds ran past 260 characters, none at 1.1). " + FORCED),
    DemoPreset("11 · Ask it to call a tool itself (use-tools prompt)", "How many letters r are in 'strawberry'? "
               "Use the Python tool.", system="Use tools", tools=["python", "search"],
               note="The system prompt explains the call format. If the model writes a well-formed "
                    "<tool_call>…</tool_call>, sampling stops there, the code runs and the output is pasted back. "
                    "A 135M model rarely gets the format right: the tool loop then shows a note, never a crash."),
    DemoPreset("12 · Who built you? (plain prompt)", "Who built you?", system="Plain assistant",
               note="Without an identity, the answer comes from statistics of its training data: it may name "
                    "Hugging Face (it saw its own SFT identity data), OpenAI (the most common answer on the web) or "
                    "someone invented."),
    DemoPreset("12 · Who built you? (identity system prompt)", "Who built you?", system="Identity",
               note="The same question with an identity in the system prompt: the answer comes from the context. "
                    "Big labs also hard-code a few hundred identity conversations into SFT."),
    DemoPreset("13 · Emily's apples, answer directly", EMILY + " Reply with only the number.", temperature=0.0,
               note="The correct answer is $3 ((13 - 2·2) / 3). Asked for the number alone, the model must do all "
                    "the arithmetic inside the computation of one token."),
    DemoPreset("13 · Emily's apples (bigger numbers), one token", EMILY_BIG, prefix="The answer is $",
               max_tokens=1, temperature=0.0,
               note="The answer is $7 ((869 - 177·4) / 23). The turn starts with \"The answer is $\" and gets "
                    "exactly one token: there is no room to compute, so the digit is a guess."),
    DemoPreset("13 · Emily's apples, step by step", EMILY + " Work it out step by step, then give the answer.",
               temperature=0.0, max_tokens=300,
               note="Spreading the work over many tokens gives each token a little computation to do. A label that "
                    "states the answer first is worse than one that reasons first. (135M still slips often.)"),
    DemoPreset("13 · Emily's apples, with code (forced call)", EMILY, tools=["python"],
               prefix=python_call("oranges = 2 * 2\napples_total = 13 - oranges\nprint(apples_total / 3)"),
               lead_in=PYTHON_LEAD_IN, repetition_penalty=1.3,
               note="\"Use code\": the arithmetic runs in Python and the model only has to read off the result. " + FORCED),
    DemoPreset("13 · Count 177 dots (no tools)", "How many dots are here?\n" + DOTS, temperature=0.0,
               note="The dots are a handful of long tokens, not 177 separate symbols: counting them in the head is "
                    "hopeless (see the tokens view). The right answer is 177."),
    DemoPreset("13 · Count 177 dots (Python tool, forced call)", "How many dots are here?\n" + DOTS,
               tools=["python"], prefix=python_call(f"print(len({DOTS!r}))"), lead_in=PYTHON_LEAD_IN, repetition_penalty=1.3,
               note="Copying the dots into code and letting Python count works, because copying is easy for a "
                    "model and counting is not. " + FORCED),
    DemoPreset("13 · Every third letter of 'ubiquitous' (no tools)",
               "Print every third character of the word 'ubiquitous', starting with the first one.", temperature=0.0,
               note="The model sees 'ubiquitous' as a few tokens, not letters. The right answer is 'uqts'."),
    DemoPreset("13 · Every third letter of 'ubiquitous' (Python tool, forced call)",
               "Print every third character of the word 'ubiquitous', starting with the first one.",
               tools=["python"], prefix=python_call("print('ubiquitous'[::3])"), lead_in=PYTHON_LEAD_IN, repetition_penalty=1.3,
               note="Python works on characters, so the answer is exact. " + FORCED),
]
DEMO_BY_TITLE = {d.title: d for d in DEMOS}


def chat_models(registry) -> list[str]:
    """Every registered chat model (not base models, not reward models)."""
    from backend.models import model_names
    return model_names(registry, "chat")


def full_messages(system: str, conversation: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + list(conversation)


def turn_events(pg, model: str, system: str, conversation: list[dict], params: SamplingParams, tools: list[str],
                max_calls: int, cancel: threading.Event | None = None, prefix: str = "", lead_in: str = ""):
    """One assistant turn after `conversation` (whose last message is the user's): tool_loop events."""
    if not conversation or conversation[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    engine = pg.engines.get(model)
    if not engine.spec.chat_format:
        raise ValueError(f"model {model!r} is a base model without a chat format; use the Generate tab")
    return run_turn(engine, full_messages(system, conversation), params, Tools.from_playground(pg, tools),
                    max_calls, cancel, prefix, lead_in)


def sample_answers(pg, model: str, system: str, conversation: list[dict], params: SamplingParams, n: int) -> list[str]:
    """The same question answered n times (one shared prefill), to compare what the model "knows"."""
    engine = pg.engines.get(model)
    return [c.text for c in engine.chat(full_messages(system, conversation), params, n=n)]


_CODE_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def last_code_block(text: str) -> str | None:
    """The last fenced code block of a reply (its language tag dropped), or None."""
    blocks = _CODE_BLOCK.findall(text or "")
    return blocks[-1][1].strip() or None if blocks else None


def tokens_view(pg, model: str, system: str, conversation: list[dict], gen_prompt: bool = True):
    """The whole context as the model sees it: (backend.tokenizer_explorer.chat_view on the model's
    encoding, that encoding). The generation prompt is shown when the next turn is the assistant's."""
    from backend.tokenizer_explorer import chat_view
    enc = pg.engines.get(model).enc
    view = chat_view(full_messages(system, conversation) or [{"role": "user", "content": ""}], enc,
                     add_generation_prompt=gen_prompt and (not conversation or conversation[-1]["role"] == "user"))
    return view, enc


def as_demo_messages(system: str, conversation: list[dict]) -> list[dict]:
    """The conversation in the labeling store's form (no segments or other extras)."""
    return [label_message(m) if m["role"] == "assistant" else {"role": m["role"], "content": m["content"]}
            for m in full_messages(system, conversation)]


def send_demo(pg, user, system: str, conversation: list[dict]) -> dict:
    """Save the conversation as the user's SFT demo draft, to edit under Labeling → Write demos."""
    from backend.labels import sft
    if not conversation:
        raise ValueError("the conversation is empty")
    return sft.save(pg.db, user, as_demo_messages(system, conversation), submit=False)


def send_ranking(pg, user, model: str, system: str, conversation: list[dict], k: int = 4,
                 temperature: float = 1.0, max_tokens: int = 200) -> dict:
    """The conversation's last user prompt becomes a ranking item with k candidates from `model`."""
    from backend.labels import rankings
    prompt = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    if not prompt.strip():
        raise ValueError("the conversation has no user prompt")
    return rankings.create_set_from_model(pg.db, pg.engines, user, f"From chat: {prompt[:60]}", [prompt], model,
                                          k, temperature, 1, max_tokens)
