"""python -m backend.train KIND [options]: run one training job in the foreground.

    python -m backend.train pretrain --preset cpu-5min --corpus python-docs --max-seconds 300
    python -m backend.train pretrain --config run.yaml --resume
    torchrun --standalone --nproc_per_node 2 -m backend.train sft --config sft.yaml     # 2 processes (DDP)
    python -m backend.train family --set budget=cpu-1h     # tools, thinking and pelican-RLHF models, one by one
    python -m backend.train reward --set name=rm-judge --set bundled_set=judge     # a reader's rule, the judge
    python -m backend.train rlhf --set reward_model=rm-a --set held_out_reward_model=rm-judge --set preset=reward-hacking

Options given on the command line override the YAML file. Events print as they come (one line each);
Ctrl-C stops at the end of the current step, keeps a checkpoint and registers the model. Under torchrun
every rank runs the same command; rank 0 alone prints, checkpoints and registers (backend/train/dist.py).
The worker launches multi-process jobs this way, with the hidden --job-* flags: events as JSON lines
("@event {...}") on stdout, a stop file for cancel.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from backend.config import AppConfig


def _pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a GPT from scratch on a corpus")
    p.add_argument("--config", help="YAML file of PretrainConfig fields")
    p.add_argument("--preset", help="model size (models/presets.py): tiny, cpu-5min, cpu-1h, gpu-d12, gpu-smollm2-135m")
    p.add_argument("--corpus", nargs="+", help="python-docs, python-stdlib, files (.txt .md .jsonl .parquet), hf:NAME")
    p.add_argument("--max-corpus-chars", type=int, help="use only the first N characters of the corpus")
    p.add_argument("--tokenizer", help="auto (a BPE trained on the corpus), cl100k_base, smollm2, or a trained BPE name")
    p.add_argument("--name", help="run and model name")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-seconds", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun: DDP (default) or FSDP2 (sharded)")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="continue the run's latest checkpoint")
    p.add_argument("--fresh", action="store_true", default=None, help="delete a run of the same name first")
    p.add_argument("--no-register", dest="register", action="store_false", default=None)
    p.add_argument("--data-dir", help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
    _job_flags(p)


EVENT_PREFIX = "@event "  # a line of stdout that carries one event, for the worker (--json-events)


def _job_flags(p) -> None:
    """What the worker passes when it launches a job with torchrun (hidden from --help)."""
    p.add_argument("--job-id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--job-resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job-device", help=argparse.SUPPRESS)
    p.add_argument("--snapshot", help=argparse.SUPPRESS)
    p.add_argument("--json-events", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-file", help=argparse.SUPPRESS)


# Kinds whose config fields are also flags (--max-steps 40), with shorter names for the main ones.
FLAG_KINDS = {
    "idk": {"parent_model": "--model", "n_samples": "--samples"},
    "distill": {"parent_model": "--student", "n_problems": "--problems", "n_samples": "--samples"},
}


def _field_flags(p, kind: str, aliases: dict[str, str]) -> None:
    """A flag per scalar (or list of strings) field of the kind's config; unset flags leave the YAML's value."""
    import dataclasses
    import typing

    from backend.jobs.kinds import get_trainer
    cls = get_trainer(kind).config_cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, names = hints[f.name], ["--" + f.name.replace("_", "-")]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and len(args) == 1:
            tp = args[0]  # "str | None": a str flag
        if f.name in aliases:
            names.insert(0, aliases[f.name])
        kw = {"dest": f.name, "default": None}
        if tp is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif tp in (int, float, str):
            p.add_argument(*names, type=tp, **kw)
        elif tp == list[str]:
            p.add_argument(*names, nargs="+", **kw)


def _registered_parsers(sub) -> None:
    """Every other trainer kind registered in backend/jobs/kinds.py: its config from a YAML file (and, for
    the kinds of FLAG_KINDS, from flags)."""
    from backend.jobs.kinds import get_trainer, kinds
    for kind in kinds(training_only=True):  # report cards: python -m backend.evals
        if kind == "pretrain":
            continue
        if kind in FLAG_KINDS:
            p = sub.add_parser(kind, help=get_trainer(kind).description)
            p.add_argument("--config", help=f"YAML file of {kind} config fields (flags override it)")
            p.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
            p.add_argument("--data-dir", help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
            _field_flags(p, kind, FLAG_KINDS[kind])
            _job_flags(p)
            continue
        p = sub.add_parser(kind, help=get_trainer(kind).description)
        p.add_argument("--config", help=f"YAML file of {kind} config fields (default: the config's defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="one config field, read as YAML (budget=tiny, members=[tools]); overrides --config")
        p.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
        p.add_argument("--data-dir", help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
        _job_flags(p)


def _run_registered(args, fields: dict, stop: threading.Event, emit) -> None:
    from backend.jobs.kinds import JobContext, get_trainer, parse_config
    app = AppConfig(data_dir=args.data_dir) if args.data_dir else AppConfig()
    try:
        cfg = parse_config(args.kind, fields, app)
        ctx = JobContext(app, emit=emit, stop=stop, job_id=args.job_id, resume=args.resume or args.job_resume,
                         device=args.job_device, snapshot_hash=args.snapshot)
        out = get_trainer(args.kind).run(cfg, ctx)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if _rank() == 0:
        print(f"done ({out.reason}) at step {out.step}; checkpoint {out.checkpoint}; model {out.model!r}", flush=True)
        if out.summary.get("table"):
            from backend.train.generated import format_table
            print(format_table(out.summary["table"]), flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _json_event(ev: dict) -> None:
    print(EVENT_PREFIX + json.dumps(ev, default=str), flush=True)


def _watch_stop_file(path: str, stop: threading.Event) -> None:
    """Set `stop` once `path` exists (the worker's cancel for a job running under torchrun)."""
    def watch():
        while not stop.wait(0.2):
            if os.path.exists(path):
                stop.set()
    threading.Thread(target=watch, name="stop-file", daemon=True).start()


def _yaml(text: str):
    """Safe YAML, with 2e-5 read as a number: PyYAML follows YAML 1.1, whose floats need a dot ("2.0e-5"),
    and would pass a learning rate written the usual way on as the string '2e-5' (YAML 1.2 and JSON read it
    as a number, as we do)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+.0123456789"))
    return yaml.load(text, Loader=Loader)


def _load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    import yaml
    try:
        d = _yaml(Path(path).read_text()) or {}
    except OSError as e:
        sys.exit(f"--config: cannot read {path}: {e.strerror}")
    except yaml.YAMLError as e:
        sys.exit(f"--config: {path} is not valid YAML: {e}")
    if not isinstance(d, dict):
        sys.exit(f"--config: {path} must hold a mapping of config fields")
    return d


def _overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs, each value read as YAML (so numbers, booleans and lists keep their types)."""
    import yaml
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            sys.exit(f"--set: expected KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = _yaml(value) if value.strip() else ""
        except yaml.YAMLError as e:
            sys.exit(f"--set {key}: {value!r} is not a valid value: {e}")
    return out


def _print_event(ev: dict) -> None:
    if "table" in ev:
        return  # printed at the end, with the result
    if "sample" in ev:
        print(f"--- sample at step {ev['step']}: {ev['prompt']!r} ->\n{ev['sample']}\n---", flush=True)
    elif "lr" in ev and not {"loss", "tokens_per_s", "mfu", "elapsed"} <= ev.keys():
        print(json.dumps(ev), flush=True)  # post-training kinds log their own step fields
    elif "lr" in ev:
        bpb = f"  val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
        print(f"step {ev['step']:6d}  loss {ev['loss']:.4f}{bpb}  lr {ev['lr']:.2e}  "
              f"{ev['tokens_per_s']:,.0f} tok/s  mfu {100 * ev['mfu']:.2f}%  {ev['elapsed']:.0f}s", flush=True)
    else:
        print(json.dumps(ev), flush=True)


@record  # under torchrun: a rank's exception reaches torchrun's failure summary (and so the job's error)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    _pretrain_parser(sub)
    _registered_parsers(sub)
    args = parser.parse_args(argv)
    job_keys = ("job_id", "job_resume", "job_device", "snapshot", "json_events", "stop_file")
    emit = _json_event if args.json_events else _print_event
    if _rank() != 0:
        emit = lambda ev: None  # noqa: E731 (rank 0 alone reports)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: (stop.set(), print("stopping after this step...", flush=True)))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.stop_file:
        _watch_stop_file(args.stop_file, stop)

    if args.kind == "pretrain" and args.job_id is not None:  # a worker's job: through the trainer interface
        _run_registered(args, _load_yaml(args.config), stop, emit)
    elif args.kind == "pretrain":
        from backend.train.pretrain import pretrain
        fields = _load_yaml(args.config)
        fields.update({k: v for k, v in vars(args).items()
                       if v is not None and k not in ("kind", "config", "data_dir", *job_keys)})
        if not fields.get("max_steps") and not fields.get("max_seconds"):
            fields["max_seconds"] = 300.0  # a run needs an end; from the shell, default to five minutes
            if _rank() == 0:
                print("no --max-steps or --max-seconds given: training for 300 seconds", flush=True)
        app = AppConfig(data_dir=args.data_dir) if args.data_dir else AppConfig()
        from backend.jobs.kinds import parse_config
        try:
            cfg = parse_config("pretrain", fields, app)  # unknown keys and wrong types name the key
        except ValueError as e:
            sys.exit(f"error: {e}")
        try:
            result = pretrain(cfg, app, on_event=emit, stop=stop)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        if _rank() == 0:
            print(f"done ({result.reason}) at step {result.step}: loss {result.loss}, val bpb {result.val_bpb}; "
                  f"checkpoint {result.checkpoint}; model {result.model!r}", flush=True)
    elif args.kind in FLAG_KINDS:
        fields = _load_yaml(args.config)
        fields.update({k: v for k, v in vars(args).items() if v is not None and k not in
                       ("kind", "config", "data_dir", "resume", *job_keys)})
        _run_registered(args, fields, stop, emit)
    else:
        _run_registered(args, {**_load_yaml(args.config), **_overrides(args.overrides)}, stop, emit)


if __name__ == "__main__":
    from backend.runtime import exit_process
    main()
    exit_process(0)
