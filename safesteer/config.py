"""The typed config of a run and its checks: bad values fail at start with one line
``error: key=value: why`` and exit status 2 (the entry point is :mod:`safesteer.cli`).

Each module declares the group it reads as a dataclass (:mod:`safesteer.schema`); :class:`Config`
puts them together and is registered with Hydra's ConfigStore as the schema ``conf/config.yaml``
starts from, so every value in ``conf/`` and on the command line is typed, and an unknown key is an
error. A group's ``rules(cfg)`` checks what ties its options to others.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf.errors import ConfigKeyError, ValidationError

from safesteer.cluster import ClusterConfig
from safesteer.compare import CompareConfig
from safesteer.data import DataConfig
from safesteer.driver import TrainerConfig
from safesteer.errors import SafeSteerError
from safesteer.evaluate import EvalConfig
from safesteer.learner import LearnerConfig
from safesteer.metrics import LoggerConfig
from safesteer.models import ModelConfig
from safesteer.prepare import ProbeConfig, SteeringConfig, TokensConfig
from safesteer.rollout import RolloutConfig
from safesteer.schema import check, group, option, require
from safesteer.teacher import TeacherConfig
from safesteer.workers import sequences_per_step

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("prepare", "distill", "evaluate", "export")


@dataclass
class Config:
    """The whole run: one typed group per module (each declared next to the module that reads it)."""

    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    steering: SteeringConfig = group(SteeringConfig)
    tokens: TokensConfig = group(TokensConfig)
    rollout: RolloutConfig = group(RolloutConfig)
    teacher: TeacherConfig = group(TeacherConfig)
    probe: ProbeConfig = group(ProbeConfig)
    learner: LearnerConfig = group(LearnerConfig)
    trainer: TrainerConfig = group(TrainerConfig)
    eval: EvalConfig = group(EvalConfig)
    cluster: ClusterConfig = group(ClusterConfig)
    logger: LoggerConfig = group(LoggerConfig)
    compare: CompareConfig = group(CompareConfig)
    seed: int = option()
    tag: str | None = option()
    stages: list[str] = option(default=[])
    debug: bool = option()


SCHEMA = "safesteer_schema"  # the first entry of conf/config.yaml's defaults list
ConfigStore.instance().store(name=SCHEMA, node=Config)


def _type_words(t) -> str:
    """What a value of annotation ``t`` must be, as the error message says it."""
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in get_args(t) if a is not type(None)]
    nullable = len(args) < len(get_args(t))
    if nullable:
        t = args[0]
    if get_origin(t) is list:
        (inner,) = get_args(t)
        what = {int: "a list of integers", float: "a list of numbers"}.get(inner, "a list")
    else:
        what = words.get(t, "a valid value")
    return "must be " + what + (" or null" if nullable else "")


def _annotation(key: str):
    """The annotation of the option at dotted ``key`` (None if there is no such option)."""
    node = Config
    for part in key.split("."):
        hints = get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
    return node


def type_error(e: BaseException, overrides: list[str]) -> SafeSteerError | None:
    """A composition error from OmegaConf (a value of the wrong type, an unknown key) as one line
    ``key=value: why``, with the value as given on the command line."""
    present = re.search(r"An item is already at '([\w.]+)'", str(e))
    if present:
        key = present.group(1)
        return SafeSteerError(f"+{key}={_given(overrides).get(key)}: already an option; set it without the +")
    unknown = re.match(r"Could not override '([\w.]+)'", str(e))
    if unknown:
        key = unknown.group(1)
        return SafeSteerError(f"{key}={_given(overrides).get(key)}: no such option")
    while e is not None and not isinstance(e, (ValidationError, ConfigKeyError)):
        e = e.__cause__ or e.__context__
    if e is None or not getattr(e, "full_key", None):
        return None
    key = re.sub(r"\[\d+\]$", "", str(e.full_key))
    value = _given(overrides).get(key, e.value)
    if isinstance(e, ConfigKeyError):
        return SafeSteerError(f"{key}={value}: no such option")
    t = _annotation(key)
    return SafeSteerError(f"{key}={value}: {_type_words(t) if t is not None else 'invalid value'}")


def parse_overrides(overrides: list[str]) -> list:
    return OverridesParser.create().parse_overrides(overrides)


def _given(overrides: list[str]) -> dict:
    """Each override's key and its value as the user wrote it (``-1``, not ``-1.0``)."""
    return {o.key_or_group: o.value() for o in parse_overrides(overrides) if not o.is_sweep_override()}


def compose(overrides: list[str] = (), config_name: str = "config", check: bool = True):
    """The composed config for ``overrides`` (Hydra's compose API; no run directory), checked unless
    ``check`` is false (a value of the wrong type or an unknown key is refused either way)."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        try:
            cfg = hydra_compose(config_name, overrides=list(overrides))
        except Exception as e:
            err = type_error(e, list(overrides))
            if err is None:
                raise
            raise err from None
    if check:
        validate(cfg, overrides)
    return cfg


def validate(cfg, overrides: list[str] = ()) -> None:
    """Check the composed config against the schema's bounds and choices, then the rules that tie
    options together; raise SafeSteerError naming the first bad value."""
    check(cfg, Config, shown=_given(list(overrides)))
    stages = list(cfg.stages)
    require(
        all(s in STAGES for s in stages), "stages", stages, f"each stage must be one of {', '.join(STAGES)}"
    )
    require(
        stages == [s for s in STAGES if s in stages],
        "stages",
        stages,
        f"stages run in the order {', '.join(STAGES)}",
    )
    for schema in get_type_hints(Config).values():
        if hasattr(schema, "rules"):
            schema.rules(cfg)
    seqs = sequences_per_step(cfg)
    ln = cfg.learner
    require(
        seqs % (ln.world_size * ln.micro_batch_size) == 0,
        "learner.micro_batch_size",
        ln.micro_batch_size,
        f"(trainer.prompts_per_step + trainer.anchors_per_step) x rollout.samples_per_prompt = {seqs} "
        "sequences per step must split evenly "
        f"over learner.world_size={ln.world_size} ranks x micro-batches of {ln.micro_batch_size}",
    )
