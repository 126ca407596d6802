"""Trainers. Each is one plain function `KIND(config, app_cfg, on_event=None, stop=None)` that the CLI
(`python -m backend.train KIND ...`) and the job worker both call:

    pretrain (backend/train/pretrain.py): a GPT from scratch on a corpus.
"""
