"""The typed config of a run, its checks, and the Hydra entry point: bad values fail at start with
one line ``error: key=value: why`` and exit status 2.

Each module declares the group it reads as a dataclass (:mod:`safesteer.schema`); :class:`Config`
puts them together and is registered with Hydra's ConfigStore as the schema ``conf/config.yaml``
starts from, so every value in ``conf/`` and on the command line is typed, and an unknown key is an
error. A group's ``rules(cfg)`` checks what ties its options to others.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore

from safesteer.actors import ClusterConfig
from safesteer.data import DataConfig
from safesteer.driver import TrainerConfig
from safesteer.errors import SafeSteerError, one_line
from safesteer.eval import EvalConfig
from safesteer.interrupts import STOP, exit_code
from safesteer.interrupts import cause as interrupt_cause
from safesteer.interrupts import message as stop_message
from safesteer.learner import LearnerConfig
from safesteer.metrics import LoggerConfig
from safesteer.models import ModelConfig
from safesteer.paths import RunLock, lock_holder
from safesteer.rollout import RolloutConfig
from safesteer.schema import check, group, option, require
from safesteer.steer import ProbeConfig, SteeringConfig, TokensConfig
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
    from omegaconf.errors import ConfigKeyError, ValidationError

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


def _parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _given(overrides: list[str]) -> dict:
    """Each override's key and its value as the user wrote it (``-1``, not ``-1.0``)."""
    return {o.key_or_group: o.value() for o in _parse(overrides) if not o.is_sweep_override()}


def compose(overrides: list[str] = (), config_name: str = "config", check: bool = True):
    """The composed config for ``overrides`` (Hydra's compose API; no run directory), checked unless
    ``check`` is false (a value of the wrong type or an unknown key is refused either way)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

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


def _unwritable_output_dir(argv: list[str]) -> str | None:
    """Check, before Hydra creates it, that the run directory can be written (Hydra would fail with a
    traceback). Interpolations like ``${now:...}`` are checked up to their first literal directory."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in argv if a.startswith(key)]
    raw = given[-1] if given else ("multirun" if multirun else "outputs")
    literal = raw.split("${", 1)[0]
    target = (
        Path(literal) if not literal or literal.endswith("/") or "${" not in raw else Path(literal).parent
    )
    target = target if str(target) else Path(".")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".safesteer-write-test-"):
            pass
    except OSError as e:
        return f"{key}{raw}: output directory is not writable ({e.strerror or e}: {e.filename or target})"
    return None


def _locked_output_dir(argv: list[str]) -> str | None:
    """A run directory given with ``hydra.run.dir`` that another run holds is refused before Hydra
    writes its own files into it."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not given or "${" in given[-1] or any(a in ("-m", "--multirun") for a in argv):
        return None
    holder = lock_holder(Path(given[-1]))
    if holder is None:
        return None
    return (
        f"{given[-1]}: run directory in use by another run ({holder}); wait for it to end, stop it, "
        "or choose another hydra.run.dir"
    )


def _remove_if_only_bookkeeping(run_dir: Path) -> None:
    """A run refused at validation leaves no directory behind when Hydra's own files (``.hydra/`` and an
    empty job log) are all it holds; a directory with anything else in it is left exactly as it was."""
    try:
        entries = list(run_dir.iterdir())
        if not all(
            (e.name == ".hydra" and e.is_dir()) or (e.suffix == ".log" and e.stat().st_size == 0)
            for e in entries
        ):
            return
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        for e in entries:
            if e.suffix == ".log":
                e.unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:
        pass


def _precheck(argv: list[str], config_name: str) -> str | None:
    """Compose the command line's overrides before Hydra does, so that a value of the wrong type or an
    unknown key is one line too (Hydra would print its own error). Sweeps are checked per job."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv) or os.environ.get(
        "SAFESTEER_DEBUG"
    ):
        return None
    try:
        parsed = _parse([a for a in argv if not a.startswith("-")])
    except Exception:
        return None  # Hydra names a malformed override itself
    if any(o.key_or_group == "debug" and o.value() is True for o in parsed):
        return None
    plain = [
        o.input_line for o in parsed if not (o.is_sweep_override() or o.key_or_group.startswith("hydra"))
    ]
    try:
        compose(plain, config_name)
    except SafeSteerError as e:
        return str(e)
    except Exception:
        return None
    return None


def hydra_entry(fn: Callable, config_name: str = "config") -> None:
    """Run ``fn(cfg)`` under Hydra with validation and one-line errors (tracebacks with debug=true)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    if not CONF_DIR.is_dir():
        print(
            f"error: config directory {CONF_DIR} not found (install the project with `pip install -e .`)",
            file=sys.stderr,
        )
        sys.exit(2)

    STOP.install()
    problem = (
        _precheck(sys.argv[1:], config_name)
        or _unwritable_output_dir(sys.argv[1:])
        or _locked_output_dir(sys.argv[1:])
    )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def _app(cfg) -> None:
        debug = bool(cfg.get("debug", False)) or bool(os.environ.get("SAFESTEER_DEBUG"))
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        STOP.run_dir = str(run_dir)
        lock = RunLock(run_dir)
        try:
            try:
                validate(cfg)
            except SafeSteerError:
                _remove_if_only_bookkeeping(run_dir)
                raise
            lock.acquire()
            fn(cfg)
        except (SafeSteerError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
            if debug:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        except BaseException as e:  # a stop signal, possibly wrapped by the C extension it interrupted
            stop = interrupt_cause(e)
            if stop is None or isinstance(e, SystemExit):
                raise
            print(stop_message(stop, str(run_dir)), file=sys.stderr, flush=True)
            sys.exit(exit_code(stop.signum))
        finally:
            lock.release()

    _app()
