"""Trainers. Each is one plain function `KIND(config, app_cfg, on_event=None, stop=None)`; the CLI
(`python -m backend.train KIND ...`) and the job worker (through backend/jobs/kinds.py, which parses
configs by their dataclass types) both call it:

    pretrain (backend/train/pretrain.py): a GPT from scratch on a corpus.
"""
