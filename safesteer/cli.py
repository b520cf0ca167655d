"""The command-line entry point the commands share (``run``, ``evaluate``, ``prepare``): Hydra with the
run's checks first, so that a bad value, an unwritable or locked run directory, or a stop signal ends
with one line and a non-zero exit status instead of a traceback (``debug=true`` shows it)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from safesteer.config import CONF_DIR, compose, parse_overrides, validate
from safesteer.errors import SafeSteerError, one_line
from safesteer.interrupts import STOP, exit_code
from safesteer.interrupts import cause as interrupt_cause
from safesteer.interrupts import message as stop_message
from safesteer.paths import RunLock, lock_holder


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
        parsed = parse_overrides([a for a in argv if not a.startswith("-")])
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
