"""Trainers. Each is one plain function `KIND(config, app_cfg, on_event=None, stop=None)`; the CLI
(`python -m backend.train KIND ...`) and the job worker (through backend/jobs/kinds.py, which parses
configs by their dataclass types) both call it:

    pretrain (backend/train/pretrain.py): a GPT from scratch on a corpus.

Post-training kinds register `run(config, ctx: JobContext) -> Outcome` with @trainer (backend/jobs/kinds.py)
and share backend/train/common.py (parent model, vocabulary growth, packing, log-probs, run directory):

    sft     (sft.py)    conversations, loss on assistant tokens, block-diagonal packing, +tools tokens, LoRA (lora.py)
    reward  (reward.py) backbone + scalar head, Bradley-Terry over all K-choose-2 pairs per prompt
    dpo     (dpo.py)    preference pairs against a frozen reference, beta 0.1
    grpo    (grpo.py)   verifiable rewards, group-normalised advantages, clipping, KL to the parent
    rlhf    (rlhf.py)   the GRPO loop with a reward model's score as the reward; reward-hacking presets, a
                        held-out reward model and distinct-n watching every step (hacking.py: the turning point)
"""
