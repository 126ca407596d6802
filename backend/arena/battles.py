"""Blind side-by-side battles, as in FastChat's Chatbot Arena: what the Arena tab and /api/arena call.

    b = start_battle(pg, user, "Write a joke about pelicans")      # two distinct chat models drawn at random
    for side, delta in answer_events(pg, user, b["id"]): ...        # A's answer streams, then B's
    follow_up(pg, user, b["id"], "Now make it shorter"); answer_events(...)  # optional: more turns, each side
                                                                     # keeping its own history
    vote(pg, user, b["id"], "a")                                     # a | b | tie | both_bad; reveals the names
    leaderboard(pg.db)                                               # backend.arena.ratings on every vote

`models` narrows the draw to a list of chat models (two of them drawn at random); naming exactly two
battles those two, still on random sides, so the voter does not know which answer is whose. Answers come
from the Chat tab's service (backend.chat_service.turn_events: the model's own chat format and default
system prompt, no tools). Only the battle's owner sees it and votes, once; the names are hidden until then.
"""
from __future__ import annotations

import random
import threading
from typing import Iterator

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from backend import chat_service
from backend.arena import ratings
from backend.db.models import ArenaBattle, ArenaVote
from backend.serving.sampling import SamplingParams

MAX_PROMPT_CHARS = 8000
MAX_TOKENS = 2048
MAX_TURNS = 8  # user turns in one battle (the first and its follow-ups)
SIDES = ("a", "b")

SAMPLE_PROMPTS = [  # DEMOS 16-18: open-ended prompts with no checkable answer are what the arena is for
    "Write a joke about pelicans.",
    "Explain what a tokenizer does, in two sentences.",
    "Give me three tips for learning to cook.",
    "What is the capital of France?",
    "Write a haiku about the ocean.",
]


class ModelUnavailable(RuntimeError):
    """A model of the battle is registered but could not be loaded (HTTP 503)."""


def pick_pair(candidates: list[str], rng: random.Random | None = None) -> tuple[str, str]:
    """Two distinct models from `candidates`, in random order (side A first)."""
    pool = sorted(set(candidates))
    if len(pool) < 2:
        raise ValueError(f"a battle needs two different chat models; got {', '.join(pool) or 'none'}")
    a, b = (rng or random).sample(pool, 2)
    return a, b


def check_models(pg, models: list[str] | None) -> list[str]:
    """The draw: `models` if given (each must be a registered chat model), else every chat model."""
    chat = chat_service.chat_models(pg.registry)
    if not models:
        if len(chat) < 2:  # a fresh install has only the bundled SmolLM2
            raise ValueError(f"the arena needs two chat models and only {', '.join(chat) or 'none'} is registered; "
                             "fine-tune one in the Training tab (SFT, DPO, RLHF, GRPO) and it joins the draw")
        return chat
    for name in models:
        if name not in chat:
            from models.registry import ROLE_WORDS
            kind = ROLE_WORDS[pg.registry.get(name).role] if name in pg.registry.names() else "not a registered model"
            raise ValueError(f"models: {name!r} is {kind}; the arena battles chat models: {', '.join(chat)}")
    return list(models)


def sampling_params(temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 256,
                    seed: int | None = None, **penalties: float) -> SamplingParams:
    """`penalties`: frequency_penalty, presence_penalty, repetition_penalty (SamplingParams fields)."""
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}, got {max_tokens!r}")
    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, **penalties).validate()


def start_battle(pg, user, prompt: str, models: list[str] | None = None, params: SamplingParams | None = None,
                 rng: random.Random | None = None) -> dict:
    """A new battle (status "answering") on two models from the draw; its public view (no names)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    params = params or sampling_params()
    a, b = pick_pair(check_models(pg, models), rng)
    with pg.db.session() as s:
        battle = ArenaBattle(user_id=user.id, prompt=prompt, model_a=a, model_b=b, status="answering",
                             params={"temperature": params.temperature, "top_p": params.top_p,
                                     "max_tokens": params.max_tokens, "seed": params.seed})
        s.add(battle)
        s.flush()
        return public_view(battle, None)


def answer_events(pg, user, battle_id: int, cancel: threading.Event | None = None) -> Iterator[tuple[str, str]]:
    """Generate the battle's two answers, A then B (the engine serves one request at a time anyway), yielding
    (side, text delta) as they stream. Both answers are stored at the end (status "ready"); a failure marks
    the battle "failed" and re-raises; a cancel leaves nothing to vote on (status "failed", error "cancelled")."""
    battle, _ = _load(pg, user, battle_id)
    if battle.status != "answering":
        raise ValueError(f"battle {battle_id} is {battle.status}, not waiting for its answers")
    params = SamplingParams(**battle.params)
    answers = {}
    try:
        for side, model in zip(SIDES, (battle.model_a, battle.model_b)):
            try:
                pg.engines.get(model)
            except ValueError:  # unknown model (deleted since the battle started)
                raise
            except Exception as e:  # a model on disk that does not load: say which, plainly
                raise ModelUnavailable(f"model {side.upper()} could not be loaded: {type(e).__name__}") from e
            result = None
            for ev in chat_service.turn_events(pg, model, "", conversation(battle, side), params, [], 0, cancel):
                if ev.type == "text":
                    yield side, ev.text
                elif ev.type == "done":
                    result = ev.result
            if result is None or result.finish_reason == "cancelled":
                raise _Cancelled()
            answers[side] = result.message.get("content", "")
    except (_Cancelled, GeneratorExit):  # a cancel, or the consumer went away mid-answer
        _finish(pg, battle_id, status="failed", error="cancelled")
        return
    except BaseException as e:
        _finish(pg, battle_id, status="failed", error=str(e) or type(e).__name__)
        raise
    _finish(pg, battle_id, status="ready", answer_a=answers["a"], answer_b=answers["b"])


class _Cancelled(Exception):
    pass


def conversation(battle: ArenaBattle, side: str) -> list[dict]:
    """What the model of `side` sees: every user turn with its OWN earlier answers (never the other side's)."""
    messages = []
    for t in battle.turns or []:
        messages += [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t[f"answer_{side}"]}]
    return messages + [{"role": "user", "content": battle.prompt}]


def follow_up(pg, user, battle_id: int, prompt: str) -> dict:
    """Another user turn for both models of a battle not yet voted on (status "answering" again); answer_events
    then answers it, each model continuing its own conversation. The vote judges the whole conversation."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    with pg.db.session() as s:
        battle, existing = _load(pg, user, battle_id, s)
        if existing is not None:
            raise ValueError(f"battle {battle_id} already has a vote; start a new battle to talk further")
        if battle.status != "ready":
            raise ValueError(f"battle {battle_id} is {battle.status}: a follow-up needs both answers first")
        if len(battle.turns or []) + 1 >= MAX_TURNS:
            raise ValueError(f"battle {battle_id} has {MAX_TURNS} turns, the most a battle takes; vote on it")
        battle.turns = [*(battle.turns or []), {"prompt": battle.prompt, "answer_a": battle.answer_a,
                                                "answer_b": battle.answer_b}]
        battle.prompt, battle.answer_a, battle.answer_b, battle.status = prompt, None, None, "answering"
        s.flush()
        return public_view(battle, None)


def _finish(pg, battle_id: int, **values) -> None:
    with pg.db.session() as s:
        battle = s.get(ArenaBattle, battle_id)
        for k, v in values.items():
            setattr(battle, k, v)


def run_battle(pg, user, prompt: str, models: list[str] | None = None, params: SamplingParams | None = None,
               rng: random.Random | None = None) -> dict:
    """start_battle + both answers to the end: the battle ready to vote on (names hidden)."""
    battle = start_battle(pg, user, prompt, models, params, rng)
    for _ in answer_events(pg, user, battle["id"]):
        pass
    return get_battle(pg, user, battle["id"])


def _load(pg, user, battle_id: int, session=None) -> tuple[ArenaBattle, ArenaVote | None]:
    def load(s):
        battle = s.get(ArenaBattle, battle_id)
        if battle is None:
            raise LookupError(f"no battle {battle_id}")
        if battle.user_id != user.id:
            raise PermissionError(f"battle {battle_id} is another user's")
        return battle, s.scalar(select(ArenaVote).where(ArenaVote.battle_id == battle_id))
    if session is not None:
        return load(session)
    with pg.db.read() as s:
        return load(s)


def public_view(battle: ArenaBattle, vote: ArenaVote | None) -> dict:
    """What the voter may see: the names only once the battle has its vote."""
    out = {"id": battle.id, "prompt": battle.prompt, "status": battle.status, "answer_a": battle.answer_a,
           "answer_b": battle.answer_b, "params": battle.params, "error": battle.error, "winner": None,
           "model_a": None, "model_b": None, "set_aside": None, "turns": list(battle.turns or [])}
    if vote is not None:
        out.update(winner=vote.winner, model_a=battle.model_a, model_b=battle.model_b, set_aside=vote.set_aside)
    return out


def get_battle(pg, user, battle_id: int) -> dict:
    return public_view(*_load(pg, user, battle_id))


def vote(pg, user, battle_id: int, winner: str) -> dict:
    """Record the battle's one vote and reveal the names."""
    ratings.score_a(winner)  # validates the winner
    try:
        with pg.db.session() as s:
            battle, existing = _load(pg, user, battle_id, s)
            if existing is not None:
                raise ValueError(f"battle {battle_id} already has a vote ({existing.winner}); one vote per battle")
            if battle.status != "ready":
                raise ValueError(f"battle {battle_id} is {battle.status}: there is nothing to vote on yet"
                                 if battle.status == "answering" else
                                 f"battle {battle_id} failed ({battle.error}); start a new one")
            from backend.arena.identity import identity_leak
            said = {side: "\n".join(t[f"answer_{side}"] or "" for t in [*(battle.turns or []), {
                "answer_a": battle.answer_a, "answer_b": battle.answer_b}]) for side in SIDES}  # every turn
            leak = identity_leak(pg.registry, said, [battle.model_a, battle.model_b])
            v = ArenaVote(battle_id=battle_id, user_id=user.id, winner=winner, set_aside=leak)
            s.add(v)
            s.flush()
            return public_view(battle, v)
    except IntegrityError:  # a concurrent vote on another database connection got there first
        raise ValueError(f"battle {battle_id} already has a vote; one vote per battle") from None


def all_votes(db) -> list[tuple[str, str, str]]:
    """Every counted vote as (model_a, model_b, winner), oldest first (online Elo depends on the order); votes
    set aside (an answer named its model) are left out."""
    with db.read() as s:
        rows = s.execute(select(ArenaBattle.model_a, ArenaBattle.model_b, ArenaVote.winner)
                         .join(ArenaVote, ArenaVote.battle_id == ArenaBattle.id)
                         .where(ArenaVote.set_aside.is_(None)).order_by(ArenaVote.id))
        return [tuple(r) for r in rows]


def set_aside_count(db) -> int:
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(ArenaVote).where(ArenaVote.set_aside.is_not(None)))


def leaderboard(db, bootstrap: int = 100, seed: int = 0, k: float = 32.0) -> dict:
    """backend.arena.ratings.leaderboard over every vote so far."""
    if not isinstance(bootstrap, int) or not 0 <= bootstrap <= 1000:
        raise ValueError(f"bootstrap must be an integer from 0 to 1000, got {bootstrap!r}")
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k!r}")
    return {**ratings.leaderboard(all_votes(db), bootstrap=bootstrap, seed=seed, k=k), "set_aside": set_aside_count(db)}
