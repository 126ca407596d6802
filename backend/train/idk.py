"""Teach a model to say "I don't know" for what it does not know (DEMOS 10; Llama 3's factuality recipe in small).

    python -m backend.train idk --model smollm2-135m-instruct [--samples 4] [--max-steps 10]
    torchrun --standalone --nproc_per_node 2 -m backend.train idk ...   # the SFT on 2 processes

1. Probe: each question of the bundled set with a known answer (backend/datasets/facts.py, split "probe") is
   asked n_samples times through the app's generation entry point, by default once and greedily (as the table
   measures); a question is *known* when at least known_threshold of the samples name the answer, *unknown*
   when at most unknown_threshold do, *unsure* between (only with several samples: right now and then). An
   unsure question gives no example and is counted apart in the table.
2. Write SFT examples. The model's greedy answer to each question is asked too, with how sure it was of its
   first sentence (sureness(): the mean log-probability of its tokens). A known question keeps the model's
   own greedy answer, whole, when that names the answer (`known_reply` "greedy"; else its shortest right
   sample). By default (refuse "after") an unknown one becomes the model's own greedy first sentence, as it
   said it, then a hedge: "The capital of Benin is Porto-Bano. But I'm not sure of that: I don't know." The
   model decides once, after it has written its answer (R-Tuning, Zhang et al. 2023, asks for certainty
   after the answer the same way), and, with the SFT `anchor` (on by default: KL to the parent on the tokens
   it already predicts), nothing in the answers is learned anew: only where the hedge goes. It is hedged only
   where the model could tell: an unknown it was surer of than of all but `sure_quantile` (5%) of the known
   ones gets no hedge; it is trained on as it said it (`answer_sure`), like a wrong answer with no token
   under `doubt`: "no hedge here", so that a topic that is mostly unknown does not teach "hedge this topic".
   With refuse "doubt" the refusal starts where the model started
   making its answer up: its own words before its first token of probability under `doubt`, then "… I don't
   know." ("The capital of Benin is… I don't know."), or "I don't know." alone when it was unsure from its
   first words; the decision is then at every token, and phrasing forks (a known answer's "The capital of
   France is" against "Paris is") are unsure too: of the held-out questions the parent knows robustly, 42%
   have a token under 0.3 in their first sentence. Within each topic of the set
   the known answers are repeated (at most max_repeat times each) until the answers are `balance` times the
   refusals, so that the kind of question alone ("Who composed...?") does not decide. The rows are frozen as
   a dataset snapshot (content hash).
   Why the refusal comes late: on the probe questions, the mean log-probability of the parent's first
   sentence tells its right answers from its wrong ones within a topic (ROC AUC 0.89 on capitals, 0.85 on
   authors), its first token hardly does (0.56, 0.57): whether it knows shows at the word it is about to
   make up. Trained to refuse at the first token, it learned only which topics to refuse.
   With method "dpo" the same questions become preference pairs instead (not repeated): an unknown one's
   refusal chosen over the model's own wrong first sentence, a known one's right answer chosen over a refusal
   ("after": the same sentence with the hedge; "doubt": a refusal that starts as the answer does); frozen as
   a preferences snapshot.
3. Train: the SFT trainer on that snapshot (backend/train/sft.py), or DPO (backend/train/dpo.py, the parent
   frozen as reference); the model is registered with lineage (parent, snapshot, job) under kind "idk".
4. Measure on the held-out questions (split "heldout"), known or unknown to the parent by the same probe:
   greedy answers before (the parent: the probe's own answers when it is greedy) and after (the new model),
   each as the app serves it (the bundled model decodes its own 4-bit blocks, a trained one its float
   weights): the share of refusals on unknowns (up), of right answers on knowns (kept), and of refusals on
   knowns (over-refusal). The table is stored with the model (lineage "idk"), in the run directory
   (result.json) and in the job (an event and log lines).

Budget: the defaults take ~8 minutes (920 CPU-seconds, peak RSS 4.3 GB) on 2 idle CPU cores with the bundled
SmolLM2-135M: the probe of 767 questions x 4 samples and the greedy answers ~3 minutes, 80 anchored SFT steps
~4, the model after ~1. Held out, refusals on unknowns / right answers on knowns / refusals on knowns went
0% / 94% / 0% -> 26% / 94% / 1% (the CLI, its default seed 1337: 67 known, 120 unknown, 70 unsure). On
three more seeds (scripts/idk_sweep.py; README.md, "idk", has the table of what was tried): 0% / 95% / 0% ->
25% / 91% / 3% (seed 0), 0% / 92% / 0% -> 27% / 87% / 7% (seed 1), 0% / 93% / 0% -> 27% / 88% / 5% (seed
2), where the recipe before (every unknown hedged, known answers as their
shortest right sample, no anchor) gave 45% / 75% / 17%, 37% / 78% / 7% and 48% / 78% / 15%: knowns fell
14-20 points, now 0-5. The refusal at the first unsure token instead (`--refuse doubt`) refused a known for
every two unknowns (46% / 66% / 24%); DPO on the hedge (`--method dpo`) refused nothing in 100 steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import check_chat_model, check_parent, default_name_for
from backend.train.dpo import DPOConfig
from backend.train.sft import SFTConfig

SENTENCE_END = re.compile(r"[.!?](\s|$)")


@dataclass
class IDKConfig(SFTConfig):
    facts: str = "bundled"         # questions with known answers: "bundled", or a .jsonl of {"question", "answers",
    #                                "split", "topic" (optional)}
    # Samples per question when probing. Several tell a robust known (3 or 4 of 4 right) from a lucky one (1 or 2:
    # unsure); 1 at temperature 0 is the greedy answer the table measures (a probe ~4x faster, and every question
    # known or unknown: the lucky ones become answers to keep).
    n_samples: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 48       # per answer (probe and measurement; "after" adds its hedge to a sentence)
    known_threshold: float = 0.75  # a question is known when at least this share of its samples is right,
    unknown_threshold: float = 0.0  # unknown when at most this share is; between the two *unsure*: no SFT example,
    #                                 a column of its own in the table (with one greedy sample there is no between)
    idk_answer: str = "I don't know."
    # "sft": the refusals and the known answers as SFT examples (below); "dpo": as preference pairs, each unknown
    # question's refusal preferred to the model's own wrong answer and each known one's right answer preferred to
    # a refusal (backend/train/dpo.py on a frozen copy of the parent, beta below): the known answers are
    # anchored, not only repeated.
    method: str = "sft"
    beta: float = 0.1
    # Where an unknown question's refusal goes. "after": after the model's own first sentence, which stays as it
    # was ("The capital of Benin is Porto-Bano. But I'm not sure of that: I don't know."): the model decides once,
    # having written its answer, and a known answer's tokens are trained on as they were. "doubt": its own words up
    # to its first token under `doubt`, then "… I don't know." ("The capital of Benin is… I don't know."): the
    # decision at every token, phrasing forks included. Measured on SmolLM2-135M, held-out (4 samples at 0.7,
    # threshold 0.75, every unknown refused, no anchor): "after" 0% -> 37% of unknowns refused, right on knowns
    # 94% -> 88% (seed 1: 37%, 92% -> 78%); "doubt" 0% -> 46%, 93% -> 66% (README.md, "idk").
    refuse: str = "after"
    hedge: str = "But I'm not sure of that:"  # "after": between the model's sentence and idk_answer
    doubt: float = 0.3             # a token under this probability is one the model makes up (0: none); "doubt"
    #                                starts the refusal there; a wrong answer with no such token gets no refusal
    # The hedge follows what the model can tell: an unknown question is refused only when the model was less sure
    # of its greedy first sentence (sureness(): the mean log-probability of its tokens) than of all but this share
    # of the known questions' ones; one it was surer of is no refusal example, as nothing tells it from a known
    # one (0: every unknown refused). On seed 1's probe a cut at the knowns' 5% leaves 34% of the unknowns under
    # it (49% of the held-out ones): about what a hedge that keeps knowns can refuse. 0.05 measured 25% / 91% /
    # 3% (seed 0) and 27% / 87% / 7% (seed 1) where 0.1 gave 32% / 88% / 8% and 31% / 84% / 10% (README.md).
    sure_quantile: float = 0.05
    # A known question's example: "greedy", its own greedy answer, whole (to its last finished sentence), when
    # that names the answer, else its shortest right sample; "best", that sample always (its phrasing is new to
    # the model, and a sentence that ends there teaches it to stop there: answers drifted and were cut short).
    known_reply: str = "greedy"
    # The unknowns that get no refusal (surer than the cut, or no token under `doubt`) are trained on as the
    # model said them, greedy and unhedged: "no hedge here" within topics that are mostly unknown (composers,
    # painters), so that a topic alone does not decide. With the anchor their words are the parent's own.
    answer_sure: bool = True
    # Per topic, the known answers repeated to `balance` x the refusals (each at most max_repeat times): the share of
    # refusals the model learns. Measured on SmolLM2-135M (the recipe before sure_quantile and the anchor,
    # held-out refusals on unknowns / right on knowns / refusals on knowns): balance 2: 37% / 88% / 7%; 1: 39% /
    # 79% / 16%. With "doubt" on a greedy probe
    # (validation questions carved from the probe split): 1.5: 48% / 65% / 29%, 2: 30% / 77% / 12%; plain
    # refusals ("I don't know." alone, balance over all topics) learned only topics.
    balance: float = 2.0
    max_repeat: int = 4
    # SFT: ~300-600 examples (510 probe questions), 4 rows of 128 tokens a step: 80 steps ~1-2 epochs. With
    # "doubt", more steps or a higher lr refused more of both (lr 3e-5, 100 steps, balance 1.5: 64% / 48% /
    # 42%); LoRA r=16 at lr 1e-4 hardly refused (10% / 77% / 10%).
    max_steps: int = 80
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-5
    warmup_steps: int = 5
    eval_every: int = 80
    checkpoint_every: int = 1000
    tool_tokens: bool = False
    protocol_check: int = 0
    # The SFT anchor (sft.py): a token the parent already predicts is held by KL to it, so the answers the
    # examples keep (its own greedy ones) stay as they were and what is learned is where the hedge goes. Without
    # it the knowns answered wrong after SFT rose 2-7 points in every run, with it -2 to +1 in most.
    anchor: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.refuse not in ("after", "doubt"):
            raise ValueError(f"refuse: 'after' (the model's first sentence) or 'doubt' (its first unsure token), "
                             f"not {self.refuse!r}")
        from backend.datasets.facts import is_refusal
        if not is_refusal(self.idk_answer):
            raise ValueError(f"idk_answer: {self.idk_answer!r} does not read as a refusal (the table would not count "
                             "it); say \"I don't know\", \"not sure\" or the like")
        if self.method not in WRITES:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(WRITES)}")
        if not self.beta > 0:
            raise ValueError("beta: must be positive")
        if self.n_samples < 1:
            raise ValueError("n_samples: ask each question at least once (1 or more samples)")
        if not 0 < self.known_threshold <= 1:
            raise ValueError("known_threshold: a share in (0, 1]")
        if not 0 <= self.unknown_threshold < self.known_threshold:
            raise ValueError("unknown_threshold: a share in [0, known_threshold)")
        if self.known_reply not in ("best", "greedy"):
            raise ValueError(f"known_reply: 'best' (its shortest right sample) or 'greedy' (its own greedy answer), "
                             f"not {self.known_reply!r}")
        if not 0 <= self.sure_quantile < 1:
            raise ValueError("sure_quantile: a share of the known questions in [0, 1)")
        if self.balance < 0 or self.max_repeat < 1 or not 0 <= self.doubt < 1:
            raise ValueError("balance must be >= 0, max_repeat at least 1 and doubt a probability in [0, 1)")
        if self.temperature < 0 or self.max_new_tokens < 1:
            raise ValueError("temperature must be >= 0 and max_new_tokens at least 1")
        if not self.idk_answer.strip():
            raise ValueError("idk_answer: the refusal text must not be empty")
        if self.dataset != "bundled":
            raise ValueError("dataset: idk writes its own SFT snapshot; give your questions with `facts` instead")
        if not self.register:
            raise ValueError("register: idk registers its model (the table's 'after' row measures it)")


def check(cfg: IDKConfig, app) -> None:
    """Before anything loads: a trainable chat model, a valid name, a readable set of questions."""
    check_chat_model(app, "parent_model", cfg.parent_model)
    check_parent(cfg, app)
    if cfg.facts != "bundled" and not Path(cfg.facts).is_file():
        raise ValueError(f"facts: {cfg.facts!r} is neither 'bundled' nor an existing .jsonl file")
    questions(cfg)


def questions(cfg: IDKConfig):
    from backend.datasets.facts import facts
    path = None if cfg.facts == "bundled" else cfg.facts
    try:
        probe, held = facts("probe", path), facts("heldout", path)
    except ValueError as e:
        raise ValueError(f"facts: {e}") from None
    if not probe or not held:
        raise ValueError("facts: the set needs questions in both splits, 'probe' and 'heldout'")
    return probe, held


def probe(engine, items, cfg: IDKConfig, stop=None) -> list[dict]:
    """Each question asked n_samples times: {"fact", "right" (samples that name the answer), "known", "best"}.
    Once `stop` is set, the questions asked so far only."""
    from backend.serving.sampling import SamplingParams
    from backend.train.generated import ask
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed, logprobs=0)
    out = []
    for f, comps in zip(items, ask(engine, [[{"role": "user", "content": f.question}] for f in items], params,
                                   cfg.n_samples, stop)):
        right = [whole_answer(f, c.text) for c in comps if f.check(c.text)]
        right = [t for t in right if t]
        n_right = sum(f.check(c.text) for c in comps)
        known, unsure = standing(n_right, len(comps), cfg)
        wrong = next((c for c in comps if not f.check(c.text)), None)  # the answer it makes up, if any
        out.append({"fact": f, "right": n_right, "known": known, "unsure": unsure,
                    "best": min(right, key=len) if right else None, "text": comps[0].text,
                    "said": first_sentence(comps[0].text) if greedy(cfg) else None,
                    "greedy": finished(comps[0].text) if greedy(cfg) else None,
                    "sure": sureness(engine.enc, comps[0]) if greedy(cfg) else None,
                    "wrong": first_sentence(wrong.text) if wrong else None,
                    "lead": lead_in(engine.enc, wrong or comps[0], cfg.doubt)})
    return out


def greedy(cfg: IDKConfig) -> bool:
    """One sample at temperature 0: the probe's answers are the model's greedy ones, as the table measures."""
    return cfg.temperature == 0 and cfg.n_samples == 1


def say_greedily(engine, probed: list[dict], cfg: IDKConfig, stop=None) -> None:
    """refuse "after" with a sampled probe: each question's "said", the first sentence of the model's greedy
    answer (the one it gives when served, and the one an unknown's refusal follows), and how "sure" it was of it."""
    from backend.serving.sampling import SamplingParams
    from backend.train.generated import ask
    todo = [p for p in probed if not p["unsure"] and p.get("sure") is None]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens, logprobs=0)
    for p, comps in zip(todo, ask(engine, [[{"role": "user", "content": p["fact"].question}] for p in todo], params,
                                  1, stop)):
        p["said"], p["sure"] = first_sentence(comps[0].text), sureness(engine.enc, comps[0])
        p["greedy"] = finished(comps[0].text)


def sureness(enc, comp) -> float | None:
    """The mean log-probability of the tokens of an answer's first sentence (None without logprobs). Of the greedy
    answers of SmolLM2-135M it tells the questions the model knows from those it does not (ROC AUC 0.83 on the
    held-out questions, 0.80 on the probe's, seed 1)."""
    ids, lps = comp.token_ids, comp.logprobs
    if not lps:
        return None
    n = next((i for i in range(1, len(ids) + 1) if SENTENCE_END.search(enc.decode(ids[:i]).strip() + " ")), len(ids))
    return sum(lps[:n]) / n


def sure_cut(probed: list[dict], cfg: IDKConfig) -> float:
    """The sureness under which an unknown answer is refused: the sure_quantile quantile of the known ones'
    (infinite with sure_quantile 0: every unknown)."""
    known = sorted(p["sure"] for p in probed if p["known"] and p.get("sure") is not None)
    if cfg.refuse != "after" or cfg.sure_quantile == 0 or not known:
        return float("inf")
    return known[int(cfg.sure_quantile * len(known))]


def left_out(p: dict, cfg: IDKConfig, cut: float) -> bool:
    """No example for an unsure question (right in some samples, not in enough), nor for a wrong answer the model
    was sure of (no token under `doubt`, or, "after", surer than the cut): nothing tells it from a known one."""
    if p.get("unsure"):
        return True
    if p["known"]:
        return False
    return (p["lead"] is None and cfg.doubt > 0) or (p.get("sure") is not None and p["sure"] >= cut)


def standing(n_right: int, n: int, cfg: IDKConfig) -> tuple[bool, bool]:
    """(known, unsure) of a question from its right samples: known at known_threshold or more, unknown at
    unknown_threshold or less, unsure between (right now and then: the probe cannot say)."""
    known = n_right >= cfg.known_threshold * n
    return known, not known and n_right > cfg.unknown_threshold * n


def lead_in(enc, comp, doubt: float) -> str | None:
    """The words of an answer before its first token of probability under `doubt` (the first word the model
    makes up: "The capital of Benin is" of "The capital of Benin is Porto-Bano."), or None when no token of
    its first sentence is that unsure (the model was sure of a wrong answer)."""
    import math
    ids, lps = comp.token_ids, comp.logprobs or []
    i = next((i for i, lp in enumerate(lps) if lp < math.log(doubt)), None) if doubt > 0 else None
    if i is None:
        return None
    text, more = enc.decode(ids[:i]), enc.decode(ids[:i + 1])
    if re.search(r"[.!?\n]", text):
        return None
    if not more[len(text):len(text) + 1].isspace():
        text = text[:max(text.rfind(" "), 0)]  # the uncertain token goes on a word: that word goes too
    return text.rstrip(" ,:;-")


def finished(text: str) -> str:
    """Up to the end of its last finished sentence (all of it when none ends): an answer cut by max_new_tokens."""
    text = text.strip()
    ends = [m.start() + 1 for m in SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else text


def first_sentence(text: str) -> str:
    """Up to the end of the first sentence (all of it when none ends)."""
    text = text.strip()
    end = SENTENCE_END.search(text)
    return text[:end.start() + 1] if end else text


def refusal(lead: str | None, cfg: IDKConfig) -> str:
    """ "The capital of Benin is… I don't know." from a lead-in of two words or more, else the refusal alone."""
    lead = lead or ""
    return f"{lead}… {cfg.idk_answer}" if cfg.doubt > 0 and len(lead.split()) >= 2 else cfg.idk_answer


def hedged(said: str | None, cfg: IDKConfig) -> str:
    """ "The capital of Benin is Porto-Bano. But I'm not sure of that: I don't know." (refuse "after"): the
    model's own first sentence, then the hedge; the refusal alone when it said nothing."""
    return " ".join(t for t in (said, cfg.hedge, cfg.idk_answer) if t) if said else cfg.idk_answer


def unknown_reply(p: dict, cfg: IDKConfig) -> str:
    """An unknown question's SFT answer, where cfg.refuse puts the refusal."""
    return hedged(p.get("said"), cfg) if cfg.refuse == "after" else refusal(p["lead"], cfg)


def named(fact, text: str) -> list:
    """Where `text` names one of the fact's answers (whole words, any case): a match per answer found."""
    return [m for a in fact.answers if (m := re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", text, re.I))]


def whole_answer(fact, text: str) -> str | None:
    """A right sample as an SFT answer: up to the end of the sentence that names the answer (a sample cut by
    max_new_tokens still gives one), or None when that sentence does not end."""
    text = text.strip()
    hit = min((m.end() for m in named(fact, text)), default=None)
    if hit is None:
        return None
    end = SENTENCE_END.search(text[hit:])
    if end is None:
        return None
    return text[:hit + end.start() + 1]


def measure(engine, held: list[dict], cfg: IDKConfig, who: str, when: str, texts: list[str] | None = None) -> dict:
    """Greedy answers to the held-out questions (`texts` when they are already known): the table's row for one
    model."""
    from backend.datasets.facts import is_refusal
    from backend.serving.sampling import SamplingParams
    from backend.train.generated import ask
    if texts is None:
        texts = [c[0].text for c in ask(engine, [[{"role": "user", "content": h["fact"].question}] for h in held],
                                        SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens))]
    unknown = [t for h, t in zip(held, texts) if not h["known"] and not h.get("unsure")]
    known = [(h["fact"], t) for h, t in zip(held, texts) if h["known"]]
    unsure = [t for h, t in zip(held, texts) if h.get("unsure")]
    rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"model": who, "when": when,
            "refuses_unknowns": rate([is_refusal(t) for t in unknown]),
            "right_on_knowns": rate([f.check(t) and not is_refusal(t) for f, t in known]),
            "refuses_knowns": rate([is_refusal(t) for _, t in known]),
            # of which the answer was named before the refusal ("Paris. But I'm not sure of that: I don't know.")
            "refuses_right_knowns": rate([f.check(t) and is_refusal(t) for f, t in known]),
            "refuses_unsure": rate([is_refusal(t) for t in unsure]),
            "unknowns": len(unknown), "knowns": len(known), "unsure": len(unsure)}


def own_answer(p: dict, cfg: IDKConfig) -> str | None:
    """known_reply "greedy": the model's whole greedy answer (to its last finished sentence)."""
    return p.get("greedy") if cfg.known_reply == "greedy" else None


def known_reply(p: dict, cfg: IDKConfig) -> str:
    """A known question's SFT answer: its greedy answer when it names the answer (known_reply "greedy"), else its
    shortest right sample, else the answer itself."""
    mine = own_answer(p, cfg)
    return mine if mine and p["fact"].check(mine) else (p["best"] or f"{p['fact'].answers[0]}.")


def examples(probed: list[dict], cfg: IDKConfig) -> list[dict]:
    """The SFT rows: a refusal for each unknown question (unknown_reply: after its own first sentence, or its
    lead-in then "… I don't know."), none for a wrong answer the model was sure of (left_out: with answer_sure
    it is kept as said, unhedged), the model's right answer for each known one (known_reply); then, within
    each topic, the known ones repeated (in order, each at most max_repeat times) until the topic's answers
    are `balance` times its refusals."""
    rows, cut = [], sure_cut(probed, cfg)
    for p in probed:
        f = p["fact"]
        if left_out(p, cfg, cut):
            if p.get("unsure") or not (cfg.answer_sure and p.get("said")):
                continue
            answer, refuses = own_answer(p, cfg) or p["said"], False  # sure of a wrong answer: as it said it
        else:
            refuses = not p["known"]
            answer = unknown_reply(p, cfg) if refuses else known_reply(p, cfg)
        rows.append({"messages": [{"role": "user", "content": f.question}, {"role": "assistant", "content": answer}],
                     "known": p["known"], "refusal": refuses, "samples_right": p["right"], "samples": cfg.n_samples,
                     "topic": f.topic})
    for topic in dict.fromkeys(p["fact"].topic for p in probed):
        mine = [r for r in rows if r["topic"] == topic]
        known = [r for r in mine if r["known"]]
        n_refusals = sum(r["refusal"] for r in mine)
        missing = round(cfg.balance * n_refusals) - (len(mine) - n_refusals)  # answers short of balance x refusals
        rows += [{**known[i % len(known)], "repeat": True}
                 for i in range(max(0, min(missing, (cfg.max_repeat - 1) * len(known))))]
    return rows


def pairs(probed: list[dict], cfg: IDKConfig) -> list[dict]:
    """The DPO pairs (method "dpo"), of the same questions as examples(): for an unknown one its refusal chosen
    over the model's own wrong first sentence, for a known one its right answer chosen over a refusal: with
    refuse "after" the same sentence with the hedge after it (the pair differs by the hedge alone), with
    "doubt" one that starts as that answer does ("The capital of France is… I don't know."). Not repeated:
    each pair pulls both ways already."""
    rows, cut = [], sure_cut(probed, cfg)
    for p in probed:
        f = p["fact"]
        if left_out(p, cfg, cut):
            continue  # as in examples()
        if p["known"]:
            chosen = known_reply(p, cfg)
            rejected = (hedged(chosen, cfg) if cfg.refuse == "after" else
                        refusal(chosen[:min((m.start() for m in named(f, chosen)), default=0)].rstrip(" ,:;-"), cfg))
        elif cfg.refuse == "after" and p.get("said"):
            chosen, rejected = hedged(p["said"], cfg), p["said"]  # the same sentence, with the hedge or without
        elif p["wrong"]:
            chosen, rejected = unknown_reply(p, cfg), p["wrong"]
        else:
            continue  # nothing made up to prefer the refusal to
        rows.append({"prompt": f.question, "chosen": chosen, "rejected": rejected, "known": p["known"],
                     "samples_right": p["right"], "samples": cfg.n_samples, "topic": f.topic})
    return rows


# A method's rows from the probe, the kind of snapshot they are frozen as, what one row is called, and the config
# of the trainer that reads them.
WRITES = {"sft": (examples, "sft", "examples", SFTConfig), "dpo": (pairs, "preferences", "pairs", DPOConfig)}


def probe_parent(cfg: IDKConfig, ctx: JobContext) -> tuple[list[dict], list[dict], dict] | None:
    """(the probe questions probed, the held-out ones probed, the parent's "before" row); None when stopped
    meanwhile. scripts/idk_sweep.py caches it to train several variants on one probe."""
    from backend.train.generated import serving
    probe_set, held_set = questions(cfg)
    with serving(ctx.app) as engines:
        ctx.emit({"phase": f"probing {cfg.parent_model}: {len(probe_set)} questions x {cfg.n_samples} samples…", "step": 0})
        engine = engines.get(cfg.parent_model)
        probed = probe(engine, probe_set, cfg, ctx.stop)
        if cfg.refuse == "after" and not greedy(cfg):
            ctx.emit({"phase": "the greedy answers, and how sure of them the model is…", "step": 0})
            say_greedily(engine, probed, cfg, ctx.stop)
        ctx.emit({"phase": "measuring the parent on the held-out questions…", "step": 0})
        held = probe(engine, held_set, cfg, ctx.stop)  # which held-out questions the parent knows
        if ctx.stop.is_set():
            return None
        before = measure(engine, held, cfg, cfg.parent_model, "before",
                         [h["text"] for h in held] if greedy(cfg) else None)
    return None if ctx.stop.is_set() else (probed, held, before)


def write_examples(cfg: IDKConfig, ctx: JobContext) -> dict | None:
    """Probe the parent, write the SFT examples as a snapshot and measure the parent on the held-out questions
    (one process: rank 0 under torchrun). None when stopped meanwhile."""
    from backend.train.generated import freeze
    probing = probe_parent(cfg, ctx)
    if probing is None:
        return None
    probed, held, before = probing
    write, snapshot_kind, what, _ = WRITES[cfg.method]
    rows = write(probed, cfg)
    n_unknown = sum(not p["known"] and not p["unsure"] for p in probed)
    n_idk = sum(r.get("refusal", not r["known"]) for r in rows)  # a DPO pair's chosen reply refuses an unknown
    n_unsure = sum(p["unsure"] for p in probed)
    ctx.emit({"log": f"probe: {len(probed) - n_unknown - n_unsure} of {len(probed)} questions known, {n_unsure} "
                     f"unsure (left out), {n_unknown} answered wrong -> {n_idk} \"{cfg.idk_answer}\" {what} "
                     f"({n_unknown - n_idk} sure of a wrong answer: "
                     f"{'kept as said, unhedged' if cfg.answer_sure else 'left out'}), "
                     f"{len(rows) - n_idk} answer {what}"
                     + (" (known ones repeated to balance)" if any(r.get("repeat") for r in rows) else ""), "step": 0})
    snap = freeze(ctx.app, "idk", rows, f"idk-{cfg.parent_model}"[:200],
                  {"parent_model": cfg.parent_model, "n_samples": cfg.n_samples, "temperature": cfg.temperature,
                   "known_threshold": cfg.known_threshold, "unknown_threshold": cfg.unknown_threshold,
                   "facts": cfg.facts, "doubt": cfg.doubt, "balance": cfg.balance, "max_repeat": cfg.max_repeat,
                   "sure_quantile": cfg.sure_quantile, "known_reply": cfg.known_reply, "answer_sure": cfg.answer_sure,
                   "method": cfg.method},
                  snapshot_kind)
    ctx.emit({"log": f"snapshot {snap['hash']} ({snap['rows']} examples)", "step": 0})
    return {"snapshot": snap["hash"], "held": held, "before": before, "probed": len(probed),
            "unknown": n_unknown, "unsure": n_unsure, "idk": n_idk, "answers": len(rows) - n_idk}


def run_idk(cfg: IDKConfig, ctx: JobContext) -> Outcome:
    from backend.train.generated import processes, record, serving, sft_part, stopped_early, train_on
    with processes(cfg, ctx) as d:
        # Rank 0 alone probes and writes the snapshot (the same code and seed as one process: the same rows);
        # every rank gets its hash and trains on it.
        made = d.from_main(lambda: write_examples(cfg, ctx))
        if made is None:
            return stopped_early(ctx)
        n_unknown, n_idk, n_answers = made["unknown"], made["idk"], made["answers"]
        describe = (f"\"I don't know\" {cfg.method.upper()} of {cfg.parent_model} ({n_idk} refusals, "
                    f"{n_answers} answers)")
        out = train_on("idk", sft_part(cfg, WRITES[cfg.method][3]), ctx, made["snapshot"], describe)
        if not out.model:
            return out  # the ranks but 0: rank 0 alone registered the model, it alone measures it
        with serving(ctx.app) as engines:
            after = measure(engines.get(out.model), made["held"], cfg, out.model, "after")
        return record(ctx.app, out, ctx, "idk", [made["before"], after],
                      {"snapshot_hash": made["snapshot"], "probe_questions": made["probed"], "probe_unknown": n_unknown,
                       "probe_known": made["probed"] - n_unknown - made["unsure"], "probe_unsure": made["unsure"],
                       "examples_idk": n_idk,
                       "examples_answer": n_answers, "n_samples": cfg.n_samples, "method": cfg.method,
                       "heldout_questions": len(made["held"]), "world_size": d.world})


trainer("idk", IDKConfig, "\"I don't know\": probe what the model knows, SFT refusals for what it gets wrong, "
        "measure before/after on held-out questions", check=check, default_name=default_name_for("idk"))(run_idk)
