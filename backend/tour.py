"""The "Start here" tour: the 18 demonstrations of the Deep Dive (DEMOS.md) in the lecture's order, each naming
the tab (and sub-tab) it lives in, the preset that sets it up, and what to notice. The UI turns a step into a tab
switch plus a preset; the data lives here so the landing page, the docs and tests read the same list."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    demo: int            # DEMOS.md number
    chapter: str         # the lecture's part
    title: str
    tab: str             # top-level tab id (ui.TABS)
    notice: str          # one or two sentences: what to look at
    subtab: str | None = None     # a tab inside the tab (tokenizer, labeling)
    target: str | None = None     # which control of the tab the preset goes into ("preset", "text", "kind", ...)
    value: str | None = None      # the preset


STEPS: list[Step] = [
    Step(1, "Tokens", "Bytes to BPE merges", "tokenizer",
         "Press Start, then Step: the most frequent adjacent pair becomes symbol 256, then 257… Train draws the trade-off: "
         "a bigger vocabulary means shorter sequences.", subtab="tok-bpe"),
    Step(2, "Tokens", "How GPT-4 sees \"hello world\"", "tokenizer",
         "cl100k_base makes it 2 tokens, 15339 and 1917; the space belongs to the second. Try \"helloworld\", two "
         "spaces, or capitals: each changes the tokens.", subtab="tok-explore", target="text", value="hello world"),
    Step(3, "Tokens", "A conversation as tokens", "tokenizer",
         "The chat is one token sequence: special tokens mark each turn, and the server appends the assistant "
         "header before sampling.", subtab="tok-chat"),
    Step(4, "Tokens", "Why spelling and counting are hard", "tokenizer",
         "\"ubiquitous\" and \"strawberry\" are a few multi-letter tokens, a run of dots is a couple of long "
         "tokens, and 9.11 vs 9.9 split differently: the model never sees letters or digits one by one.",
         subtab="tok-explore", target="text",
         value="ubiquitous strawberry\n" + "." * 177 + "\n9.11 9.9"),
    Step(5, "Pretraining", "Train a small GPT from scratch", "training",
         "The loss falls from ln(vocabulary) step by step, and every few steps a sample goes from gibberish to "
         "locally coherent text (sign in as an operator to start a run).", target="kind", value="pretrain"),
    Step(6, "Base model", "Inference is sampling", "completion",
         "Generate twice with the same prompt: a different continuation each time. Step mode shows the next-token "
         "distribution and the biased coin flip; temperature, top-k and top-p reshape it.",
         target="preset", value="Top 10 landmarks in Paris (knowledge from the parameters)"),
    Step(7, "Base model", "A base model simulates documents", "completion",
         "\"What is 2+2?\" continues a document instead of answering; the regurgitation and knowledge-cutoff "
         "presets show memorised text and confident guessing.",
         target="preset", value="What is 2+2? (a document, not a question)"),
    Step(8, "Base model", "Prompting a base model", "completion",
         "A few translation pairs are enough for the pattern to continue (in-context learning); the web-page "
         "conversation preset makes an assistant that runs on and invents the next human turn.",
         target="preset", value="Few-shot translation (in-context learning)"),
    Step(9, "SFT", "Write the conversations SFT learns from", "labeling",
         "Labelers write ideal replies following the guidelines (Draft with model gives a first version to fix); "
         "a snapshot of them feeds an SFT job on the Training tab.", subtab="sft"),
    Step(10, "Hallucinations and tools", "Who is Orson Kovats?", "chat",
         "Five samples, five different confident biographies of a person who does not exist: the model "
         "imitates the style of an answer; probing what it knows is how \"I don't know\" data is made.",
         target="preset", value="10 · Who is Orson Kovats? (5 samples)"),
    Step(11, "Hallucinations and tools", "Tools: search pasted into the context", "chat",
         "The model emits a search call between special tokens, the sampler stops, runs it and pastes the result "
         "into the context (working memory) before continuing. Scripted calls are marked as such.",
         target="preset", value="10 · Orson Kovats with search (forced call)"),
    Step(12, "Hallucinations and tools", "Knowledge of self", "chat",
         "\"Who built you?\" is answered from statistics unless a system prompt (this preset) or identity "
         "conversations in SFT say otherwise; compare with the plain-prompt preset.",
         target="preset", value="12 · Who built you? (identity system prompt)"),
    Step(13, "Hallucinations and tools", "Models need tokens to think", "chat",
         "Working spread over many tokens beats an answer forced into one token; the \"with code\" presets show "
         "a tool doing the arithmetic, counting and spelling.", target="preset", value="13 · Emily's apples, step by step"),
    Step(14, "RL", "Practice: many samples, known answers", "practice",
         "Sample N solutions to a problem with a checkable answer: some are right, some wrong, and majority vote "
         "or best-of-N beats one sample. RL trains on what worked."),
    Step(15, "RL", "The R1 recipe: GRPO with verifiable rewards", "training",
         "A GRPO run: accuracy rises over steps and responses grow longer, with thinking between <think> and "
         "</think> (small steps here; on a CPU the effect is modest, the mechanism is all there).",
         target="kind", value="grpo"),
    Step(16, "RLHF", "Rank answers, train a reward model", "labeling",
         "Ranking five jokes about pelicans is easier than writing one; a reward model learns to agree with the "
         "rankings (Training tab, kind reward).", subtab="rank"),
    Step(17, "RLHF", "Reward hacking", "training",
         "Optimise against the reward model too long and its score keeps rising while the text collapses: "
         "RLHF runs briefly and stops.", target="kind", value="rlhf"),
    Step(18, "Arena", "Blind votes become a leaderboard", "arena",
         "Two anonymous models answer; vote, and the names are revealed. Ranks appear once enough votes make "
         "them mean something.", target="sample", value="Write a joke about pelicans."),
]


def step_markdown(i: int) -> str:
    s = STEPS[i]
    return (f"**Tour {i + 1} of {len(STEPS)} · {s.chapter} · {s.title}** (demo {s.demo}). "
            f"**What to notice:** {s.notice}")
