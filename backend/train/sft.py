"""Supervised fine-tuning: next-token prediction on conversations, loss on the assistant's tokens only.

    python -m backend.train sft --config sft.yaml        # or a job from the Training tab / POST /api/jobs

The same algorithm as pretraining on a different dataset (DEMOS.md 9). Each conversation is rendered by
models.chat_format.render_chat, whose mask marks the assistant's tokens (thinking, tool calls and the
answer; never the prompt, the system prompt or tool outputs). Several conversations are packed into one
row of seq_len tokens; they do not see each other: block-diagonal causal attention with RoPE positions
restarting at each conversation (Transformer.forward(doc_ids=...)), so a packed row gives exactly the
loss of separate rows (tests/test_trainers.py checks it).

New special tokens (tool_tokens=True): the encoding becomes "<tokenizer>+tools" (models.chat_format.
with_tool_tokens: <think> </think> <tool_call> </tool_call> <tool_output> </tool_output>) and the
embedding grows to match, each new row initialised to the mean of the rows of its tag's own text pieces
(extend_with_tags). The model is registered under that tokenizer name, so the engine and chat load it
with the new tokens.

Data: dataset "bundled" = the tool-use conversations of backend/datasets/tool_use.py (n_examples of them,
mix of arithmetic/counting/spelling by python call, search calls, identity); "snapshot" = the job's SFT
snapshot ({"messages": [...]} rows); or a .jsonl file of such rows. Full fine-tune, or LoRA (lora_rank > 0).
`anchor` > 0: a target token the parent already predicts (its greedy token there) is trained on with
anchor x KL(parent || model) instead of cross-entropy, the new ones as usual: the parent's own words stay where
they were (not sharpened, not drifted), a forward of the frozen parent per step (common.anchored_lm_loss).
The end-to-end check (held-out questions through the real tool loop, tuned vs untuned, tools run):
`python -m backend.bench tool_sft`.
"""
from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass

import torch

from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import (FineTuneConfig, FineTuneRun, amp_for, anchored_lm_loss, check_finite, check_parent,
                                  default_name_for, extend_for_tokens, load_parent, make_opt, masked_lm_loss,
                                  pack_examples)


@dataclass
class SFTConfig(FineTuneConfig):
    lr: float = 5e-5
    max_steps: int = 200
    seq_len: int = 512            # tokens per packed row (a longer conversation is cut)
    pack: bool = True             # several conversations per row (block-diagonal attention)
    tool_tokens: bool = True      # add the thinking/tool special tokens (tokenizer "<name>+tools")
    bundled: str = "tool-use"     # the bundled set: "tool-use", "reasoning" (<think> worked solutions: SFT before GRPO)
    #                               or "demonstrations" (annotators' replies to the pelican prompts: SFT before RLHF)
    n_examples: int = 600         # size of the bundled set
    terse_fraction: float = 0.0   # "reasoning": the share whose thinking states the answer at a glance, no steps
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["apples", "count", "spell"])  # "reasoning": problem kinds
    val_fraction: float = 0.1     # held-out conversations for the validation loss
    protocol_check: int = 20      # bundled data: held-out tool questions checked for a well-formed call at the end
    lora_rank: int = 0            # 0: full fine-tune; >0: LoRA adapters of this rank (backend/train/lora.py)
    lora_alpha: float = 16.0
    # >0: a target token the parent already predicts (its argmax) is trained on with anchor x KL(parent || model)
    # instead of cross-entropy (common.anchored_lm_loss): the parent's own words are held, only new ones learned.
    # Costs a forward of the frozen parent per step.
    anchor: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.seq_len < 16:
            raise ValueError("seq_len: must be at least 16")
        if not 0 <= self.terse_fraction <= 1:
            raise ValueError("terse_fraction: must be in [0, 1]")
        from backend.datasets.verifiable import check_kinds
        check_kinds(self.kinds)
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction: must be in [0, 1)")
        if self.bundled not in BUNDLED_SETS:
            raise ValueError(f"bundled: one of {', '.join(BUNDLED_SETS)}, not {self.bundled!r}")
        if self.anchor < 0:
            raise ValueError("anchor: the KL weight must be >= 0 (0 turns it off)")
        if self.n_examples < 2 or self.lora_rank < 0:
            raise ValueError("n_examples must be at least 2 and lora_rank not negative")
        if self.lora_rank and self.parallel == "fsdp":
            raise ValueError("parallel: 'fsdp' shards the model, not LoRA adapters; use 'ddp' with lora_rank")


BUNDLED_SETS = ("tool-use", "reasoning", "demonstrations")


def bundled_rows(cfg: SFTConfig) -> list[dict]:
    if cfg.bundled == "reasoning":
        return reasoning_rows(cfg.n_examples, cfg.seed, cfg.terse_fraction, cfg.kinds)
    if cfg.bundled == "demonstrations":
        from backend.datasets.preferences import demonstrations
        return demonstrations(cfg.n_examples, seed=cfg.seed)
    from backend.datasets.tool_use import conversations
    return conversations(cfg.n_examples, seed=cfg.seed)


def reasoning_rows(n: int, seed: int, terse_fraction: float = 0.0,
                   kinds: tuple[str, ...] | list[str] = ("apples", "count", "spell")) -> list[dict]:
    """Verifiable problems answered in R1's format: the worked steps as thinking, then "The answer is N."
    (the cold-start SFT of DeepSeek-R1 before its RL; GRPO's prompts use the same system prompt).

    terse_fraction: that share of the problems (drawn at random) think only the answer at a glance ("Each apple
    costs 3.") instead of the steps, so that the SFT model has both habits and GRPO, rewarded for accuracy alone,
    can show which one earns it (RL amplifies behaviours its starting model already has: Gandhi et al. 2025,
    "Cognitive Behaviors that Enable Self-Improving Reasoners"). The family's think pair uses 0.75 on "apples" with
    tool_tokens off: its SFT model thinks at a glance 86% of the time (30% right) and works the steps out 14% (70%
    right), and GRPO turns it into the worked habit. With new <think> tag tokens (tool_tokens on) the same SFT left
    <think> at 38% and its rollouts looped "think think…"."""
    import random
    from backend.datasets.verifiable import problems
    from backend.train.grpo import THINK_SYSTEM
    rng = random.Random(seed + 2)
    rows = []
    for p in problems(n, seed=seed + 1, kinds=kinds):
        thinking = p.short if p.short and rng.random() < terse_fraction else p.solution
        rows.append({"messages": [{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": p.question},
                                  {"role": "assistant", "thinking": thinking, "content": f"The answer is {p.answer}."}]})
    return rows


def render_rows(rows: list[dict], enc, seq_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Rendered (ids, mask) of each conversation that has assistant tokens within its first seq_len + 1."""
    from models.chat_format import render_chat
    out = []
    for i, r in enumerate(rows):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not isinstance(msgs, list):
            raise ValueError(f"dataset row {i}: expected {{\"messages\": [...]}}")
        try:
            rc = render_chat(msgs, enc)
        except ValueError as e:
            raise ValueError(f"dataset row {i}: {e}") from None
        if sum(rc.mask[1:(seq_len + 1) if seq_len else None]) == 0:
            continue  # nothing to learn (no assistant turn, or it starts after the cut)
        out.append((rc.ids, rc.mask))
    if not out:
        raise ValueError("dataset: no conversation has an assistant turn to learn from"
                         + (f" within seq_len={seq_len} tokens" if seq_len else ""))
    return out


def sft_tokenizer(tokenizer: str, enc, tool_tokens: bool, data_dir=None):
    """(name, encoding) the fine-tuned model uses: the parent's, or its "+tools" (or "+chatml") extension."""
    from models.chat_format import TOOLS_SUFFIX, has_tool_tokens
    from models.tokenizers import get_encoding, with_chat_tokens
    if tool_tokens and not has_tool_tokens(enc):
        return tokenizer + TOOLS_SUFFIX, get_encoding(tokenizer + TOOLS_SUFFIX, data_dir)
    if with_chat_tokens(enc) is not enc:
        return tokenizer + "+chatml", get_encoding(tokenizer + "+chatml", data_dir)
    return tokenizer, enc


@torch.no_grad()
def extend_with_tags(model, enc):
    """The model grown to `enc` (common.extend_for_tokens), each new thinking/tool tag's row set to the mean
    of the rows of its own text's pieces ("<", "tool", "_call", ">"), where the vocabulary mean would put it.
    The model already reads and writes that text (the tool system prompt spells it out), so the new token
    starts near its spelled-out form: measured on SmolLM2-135M with the tool prompt, <tool_call> starts
    ~500-1200 ranks from the top instead of ~22,000, and with the vocabulary mean 60 steps of SFT (lr 2e-4)
    learned every other token of the call but left <tool_call> and </tool_call> below <|im_end|>."""
    from models.chat_format import TOOL_SPECIALS
    old = model.cfg.vocab_size
    model = extend_for_tokens(model, enc)
    rows = [model.model.embed_tokens.weight] + ([] if model.cfg.tie_embeddings else [model.lm_head.weight])
    for tag in TOOL_SPECIALS:
        i = enc.encode_single_token(tag) if tag in enc.special_tokens_set else -1
        if i >= old:
            pieces = [p for p in enc.encode_ordinary(tag) if p < old]
            for w in rows:
                w[i] = w[pieces].mean(0)
    return model


def protocol_check(model, enc, tokenizer: str, n: int, seed: int) -> dict:
    """Held-out bundled questions (the "heldout" split: numbers, words, documents the training rows never
    use), answered greedily through the Engine, without running tools: the share whose
    reply opens with a well-formed call of the right tool (<tool_call>{"name": tool, "arguments": {...}}
    closed by </tool_call>), and for identity questions the share naming the assistant."""
    import copy
    import json

    from backend.datasets.tool_use import ASSISTANT_NAME, conversations
    from backend.serving.engine import Engine
    from backend.serving.sampling import SamplingParams
    from models.chat_format import END_TOOL_CALL, TOOL_CALL, has_tool_tokens, stop_token_ids
    from models.registry import ModelSpec
    if not has_tool_tokens(enc):
        return {}
    spec = ModelSpec("sft-check", "trained", None, tokenizer, "chatml", model.cfg.max_seq_len)
    engine = Engine(spec, copy.deepcopy(model).eval().requires_grad_(False), enc)
    end_call = enc.encode_single_token(END_TOOL_CALL)
    params = SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=stop_token_ids(enc) + [end_call])
    ok = calls = ident = ident_ok = 0
    for conv in conversations(n, seed=seed + 7919, split="heldout"):
        msgs = conv["messages"]
        want = msgs[-1].get("tool_calls") or []
        c = engine.complete(render_chat_prompt(msgs[:-1], enc), params)[0]
        if want:
            calls += 1
            try:
                call = json.loads(c.text.removeprefix(TOOL_CALL)) if c.text.startswith(TOOL_CALL) else None
            except json.JSONDecodeError:
                call = None
            ok += int(c.stop_token_id == end_call and isinstance(call, dict) and call.get("name") == want[0]["tool"]
                      and isinstance(call.get("arguments"), dict))
        else:
            ident += 1
            ident_ok += int(ASSISTANT_NAME in c.text)
    out = {"tool_call_wellformed": round(ok / calls, 4) if calls else None, "tool_questions": calls}
    if ident:
        out.update(identity_correct=round(ident_ok / ident, 4), identity_questions=ident)
    return out


def render_chat_prompt(messages, enc) -> list[int]:
    from models.chat_format import render_chat
    return render_chat(messages, enc, add_generation_prompt=True).ids


@torch.no_grad()
def eval_loss(model, batches, amp, device) -> float:
    from backend.train.pretrain import amp_context
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for x, y, d in batches:
        with amp_context(device, amp):
            loss = masked_lm_loss(model, x.to(device), y.to(device), d.to(device))
        k = int((y != -100).sum())
        tot += float(loss) * k
        n += k
    model.train(was)
    return tot / max(n, 1)


def train_batches(train: list, cfg: SFTConfig, order_rng: random.Random):
    """The training batches (x, y, doc_ids), endlessly: conversations in a shuffled order (shuffled again
    each epoch), taken until the batch holds batch_size rows' worth of tokens (backend/bench/train.py
    feeds the same batches to its peer)."""
    pos, order = 0, list(range(len(train)))
    order_rng.shuffle(order)
    while True:
        picked, tokens = [], 0
        while tokens < cfg.batch_size * cfg.seq_len and len(picked) < 64 * cfg.batch_size:
            if pos >= len(order):
                order_rng.shuffle(order)
                pos = 0
            ex = train[order[pos]]
            pos += 1
            picked.append(ex)
            tokens += min(len(ex[0]), cfg.seq_len + 1) - 1
            if not cfg.pack and len(picked) >= cfg.batch_size:
                break
        x, y, d = pack_examples(picked, cfg.seq_len, cfg.pack)
        if cfg.pack:
            x, y, d = x[:cfg.batch_size], y[:cfg.batch_size], d[:cfg.batch_size]
        yield x, y, d


def run_sft(cfg: SFTConfig, ctx: JobContext, kind: str = "sft", describe: str | None = None) -> Outcome:
    """`kind` and `describe`: a trainer that writes its own SFT snapshot first (idk, distill) trains through
    here, its run directory and lineage under its own kind."""
    from backend.datasets import load_rows
    from backend.train.pretrain import amp_context
    run = FineTuneRun(kind, cfg, ctx)
    try:
        torch.manual_seed(cfg.seed)
        parent, enc, spec = load_parent(run.app, cfg.parent_model, run.device)
        tok_name, enc = sft_tokenizer(spec.tokenizer, enc, cfg.tool_tokens, run.app.data_dir)
        grown = extend_with_tags(parent, enc)
        # the frozen parent the anchor holds to (a copy: when not resuming, `grown` is the model trained)
        ref = copy.deepcopy(grown).to(run.device).eval().requires_grad_(False) if cfg.anchor else None
        model = run.model_to_train(lambda: grown).to(run.device).train()
        del parent, grown
        lora = None
        if cfg.lora_rank:
            from backend.train.lora import add_lora
            lora = add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
        run.phase("tokenizing the conversations…")
        rows = load_rows(cfg.dataset, run.app, ctx.snapshot_hash, lambda: bundled_rows(cfg))
        docs = render_rows(rows, enc, cfg.seq_len)
        if len(docs) < len(rows):
            run.log(f"{len(rows) - len(docs)} of {len(rows)} conversations left out: no assistant tokens within seq_len")
        random.Random(cfg.seed).shuffle(docs)
        n_val = int(len(docs) * cfg.val_fraction)
        val, train = docs[:n_val], docs[n_val:]
        val_batches = [pack_examples(val[i:i + cfg.batch_size], cfg.seq_len, cfg.pack)
                       for i in range(0, min(len(val), 8 * cfg.batch_size), cfg.batch_size)]
        n_params = model.num_params()
        d = run.dist
        step = d.wrap(model, cfg.parallel, extra=lora)  # DDP / FSDP2 with several processes; optimizer after
        opt = make_opt(lora if lora is not None else model, cfg, run.device)
        state = run.restore(opt)
        amp = amp_for(cfg, run.device, model.cfg.dim)
        order_rng = random.Random(cfg.seed + run.step)
        run.emit({"step": run.step, "start": run.name, "kind": kind, "parent_model": cfg.parent_model,
                  "tokenizer": tok_name, "vocab_size": model.cfg.vocab_size, "params": n_params,
                  "conversations": len(train), "held_out": len(val), "device": str(run.device),
                  "precision": str(amp or torch.float32), "packing": "block-diagonal" if cfg.pack else "one per row",
                  "lora_rank": cfg.lora_rank, "anchor": cfg.anchor, "resumed": state is not None})
        if val_batches and state is None:
            full = d.full_model(model)
            if d.is_main:
                run.emit({"step": 0, "val_loss": round(eval_loss(full, val_batches, amp, run.device), 5)})
        batches = train_batches(train, cfg, order_rng)
        last_loss = None
        import time
        reason = None
        while not (reason := run.should_stop()):
            t0 = time.perf_counter()
            x, y, doc = d.take(*next(batches))  # this rank's rows of the global batch
            x, y, doc = x.to(run.device), y.to(run.device), doc.to(run.device)
            lr = run.lr()
            for g in opt.param_groups:
                g["lr"] = lr
            k = int((y != -100).sum())
            targets, ntok = d.sum(k, int((doc >= 0).sum()))
            with amp_context(run.device, amp):
                loss = step(lambda m: anchored_lm_loss(m, ref, x, y, doc, cfg.anchor) if ref is not None
                            else masked_lm_loss(m, x, y, doc))  # the mean over this rank's targets
            # weighed by this rank's share of the batch's targets: the ranks' averaged gradient is the global mean's
            (loss * (k * d.world / max(targets, 1))).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.step += 1
            last_loss = d.sum(loss.item() * k)[0] / max(targets, 1)
            check_finite(last_loss, run.step)
            dt = time.perf_counter() - t0
            ev = {"step": run.step, "loss": round(last_loss, 5), "lr": lr, "tokens_per_s": round(ntok / dt, 1),
                  "trained_tokens": int(targets), "elapsed": round(run.elapsed(), 2)}
            if val_batches and run.step % cfg.eval_every == 0:
                full = d.full_model(model)
                if d.is_main:
                    ev["val_loss"] = round(eval_loss(full, val_batches, amp, run.device), 5)
            run.emit(ev)
            if run.step % cfg.checkpoint_every == 0:
                run.checkpoint(_merged(model, lora), opt, tok_name)
        final = _merged(d.full_model(model), lora)
        if run.last_ckpt is None or not run.last_ckpt.name.endswith(f"{run.step:07d}"):
            run.checkpoint(final, opt, tok_name)
        check = {}
        if cfg.protocol_check and cfg.dataset == "bundled" and cfg.bundled == "tool-use" and d.is_main:
            check = protocol_check(final, enc, tok_name, cfg.protocol_check, cfg.seed)
            if check:
                run.emit({"step": run.step, **check, "accuracy": check["tool_call_wellformed"]})
        name = run.register(final, tok_name, f"{describe or f'SFT of {cfg.parent_model} on {cfg.dataset} data'} "
                            f"({run.step} steps{', LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else ''})",
                            {"tokenizer": tok_name, "lora_rank": cfg.lora_rank, **check})
        run.emit({"step": run.step, "done": reason, "model": name, "final_loss": last_loss, **check})
        return Outcome(reason, run.step, str(run.last_ckpt), name, {"loss": last_loss, **check})
    except BaseException as e:
        run.emit({"step": run.step, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        run.close()


def _merged(model, lora):
    """The model to save: with LoRA, a copy with the adapters folded into the weights."""
    if lora is None:
        return model
    from backend.train.lora import merged_copy
    return merged_copy(model)


trainer("sft", SFTConfig, "supervised fine-tuning on conversations (loss on assistant tokens only)",
        check=check_parent, default_name=default_name_for("sft"))(run_sft)
