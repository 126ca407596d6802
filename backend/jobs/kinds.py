"""The trainer registry: one function `run(config, ctx) -> Outcome` per training KIND.

    @trainer("sft", SFTConfig, "supervised fine-tuning on a snapshot of demonstrations")
    def run_sft(cfg: SFTConfig, ctx: JobContext) -> Outcome: ...

and one line in TRAINER_MODULES naming the module. The job worker, the REST API (to validate a config
before queueing it) and the CLI (`python -m backend.train KIND --config FILE.yaml`) all go through
`parse_config` and `get_trainer`, so a kind behaves the same from every door.

A config is a dataclass with defaults. `parse_config` rejects unknown keys and wrong types naming
the key, then calls the dataclass's own `validate()` if it has one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import types
import typing
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

from backend.config import AppConfig

log = logging.getLogger(__name__)

# Modules that register trainers with @trainer, imported on first lookup (one line per module).
TRAINER_MODULES: list[str] = [
    "backend.jobs.pretrain",
    "backend.train.sft",
    "backend.train.reward",
    "backend.train.dpo",
    "backend.train.grpo",
    "backend.train.rlhf",
    "backend.train.idk",
    "backend.train.distill",
    "backend.train.family",
    "backend.evals.job",
]


class UnknownKind(ValueError):
    pass


@dataclass
class JobContext:
    """What a trainer gets besides its config. The CLI and the worker both build one."""
    app: AppConfig
    emit: Callable[[dict], None] = lambda event: None  # the trainer's events (one dict each, see backend/train)
    stop: threading.Event = field(default_factory=threading.Event)  # set: stop after this step, keep a checkpoint
    job_id: int | None = None       # None when run from the CLI
    resume: bool = False            # continue from the run's latest checkpoint (a resumed job)
    device: str | None = None       # the worker's device; None: the config's own
    snapshot_hash: str | None = None  # the input dataset snapshot (backend.labels.snapshots)
    parent_model: str | None = None

    def log(self, text: str) -> None:
        self.emit({"log": text})


@dataclass
class Outcome:
    reason: str                     # why it ended: "max_steps", "max_seconds", "stopped", ...
    step: int
    checkpoint: str | None = None
    model: str | None = None        # the registered model's name
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Trainer:
    kind: str
    config_cls: type
    run: Callable[[Any, JobContext], Outcome]
    description: str = ""
    # Checks that need the app (known tokenizers, existing files...), run before a job is queued.
    check: Callable[[Any, AppConfig], None] | None = None
    # The run/model name of job `job_id` when the config names none.
    default_name: Callable[[Any, int], str] | None = None
    # False for a kind that registers no model (a report card): the Training form lists only kinds that train.
    trains: bool = True


_TRAINERS: dict[str, Trainer] = {}
_loaded = False


def trainer(kind: str, config_cls: type, description: str = "", check=None, default_name=None, trains: bool = True):
    """Decorator: register `run(config, ctx) -> Outcome` as the trainer of `kind`."""
    def register(run):
        _TRAINERS[kind] = Trainer(kind, config_cls, run, description, check, default_name, trains)
        return run
    return register


_broken: dict[str, str] = {}  # module -> why it could not be imported


def _load() -> None:
    """Import the trainer modules once. One that fails to import is logged and named in errors about
    unknown kinds; it does not take the other kinds down with it."""
    global _loaded
    if not _loaded:
        for module in TRAINER_MODULES:
            try:
                import_module(module)
            except Exception as e:
                _broken[module] = f"{type(e).__name__}: {e}"
                log.exception("trainer module %s could not be imported", module)
        _loaded = True


def kinds(training_only: bool = False) -> list[str]:
    _load()
    return [k for k, t in _TRAINERS.items() if t.trains or not training_only]


def get_trainer(kind: str) -> Trainer:
    _load()
    if kind not in _TRAINERS:
        broken = "".join(f"; {m} failed to import ({why})" for m, why in _broken.items())
        raise UnknownKind(f"kind: unknown training kind {kind!r}; kinds: {', '.join(_TRAINERS)}{broken}")
    return _TRAINERS[kind]


def config_fields(kind: str) -> list[dict]:
    """Name, type and default of each config field (for forms, docs and `--help`)."""
    cls = get_trainer(kind).config_cls
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append({"name": f.name, "type": _describe(hints[f.name]), "default": default})
    return out


def parse_config(kind: str, values: dict | None, app: AppConfig | None = None):
    """The kind's config dataclass from plain values (JSON body, YAML file, job row).

    Raises ValueError naming the offending key: unknown keys, wrong types, and whatever the
    dataclass's validate() (and, given `app`, the trainer's check) refuses.
    """
    t = get_trainer(kind)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config: expected a mapping of {kind} config fields, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(t.config_cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ValueError(f"config: unknown {kind} config key {unknown[0]!r}" + (f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else "")
                         + f"; known keys: {', '.join(names)}")
    hints = typing.get_type_hints(t.config_cls)
    clean = {k: _check(k, v, hints[k]) for k, v in values.items()}
    cfg = t.config_cls(**clean)
    if hasattr(cfg, "validate"):
        cfg.validate()
    if app is not None and t.check is not None:
        t.check(cfg, app)
    return cfg


def config_dict(cfg) -> dict:
    """A config dataclass back to JSON-able values (tuples become lists)."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(x):
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


# -- type checks ---------------------------------------------------------------------------------
def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _check(key: str, value, tp):
    """`value` as type `tp`, or ValueError naming `key`. Ints pass as floats; a string passes as a one-item list."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(key, value, a)
            except ValueError:
                pass
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # 1e400 reads as inf: no config field means that
                raise ValueError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_check(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise bad
    return value
