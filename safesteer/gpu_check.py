"""The GPU path on one device, without Ray or vLLM: ``python -m safesteer.gpu_check``.

Made for a bare CUDA machine that has PyTorch and nothing else (``make gpu-check``; the wheels that
travel with it are listed in deploy/gpu/README.md). On the default model, with the steering vector and
safety tokens of a finished run (``--run``), it exercises the code the actors run:

1. the student generates completions (HF ``generate``; the rollout's vLLM engine is not exercised here);
2. the HF steered teacher (:class:`safesteer.teacher.TeacherWorker`) scores them in bf16, training
   prompts steered and anchors not;
3. one DeepSpeed ZeRO-2 learner rank (:class:`safesteer.learner.LearnerWorker`, NCCL on CUDA) takes
   optimizer steps of the localized loss under bf16 autocast; the same steps in plain PyTorch on the
   same batch give the rank's throughput as a fraction of the hardware's (``learner_vs_plain``), and
   ``--profile FILE`` writes torch.profiler tables of both;
4. the learner's weight export is read back into a state dict and checked against the model.

Each stage prints one JSON line with its tokens/s and peak memory; the last line is the verdict. Exit 0
only if every check passed. It runs on CPU too (gloo, no bf16 unless asked), which the tests use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from safetensors.torch import load as load_safetensors
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from safesteer.bench.common import compose as compose_run
from safesteer.bench.common import peak_rss_mb_self
from safesteer.cluster import free_port
from safesteer.core.batch import collate, split, to_sequence_positions
from safesteer.core.generation import chat_texts, generate
from safesteer.core.loss import LocalizedStudent, micro_batch_loss
from safesteer.core.tokens import SafetyTokens
from safesteer.data import load_prompts
from safesteer.errors import SafeSteerError, one_line
from safesteer.learner import LearnerWorker
from safesteer.models import (
    convert_gguf,
    default_device,
    load_hf,
    resolve_model_path,
    use_bf16,
    verify_checkpoint,
)
from safesteer.paths import cache_dir
from safesteer.schema import typed
from safesteer.teacher import OUTPUT_FOR_LOSS, TeacherWorker


def _peak_gb(device: str) -> dict:
    if device == "cuda":
        return {"peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    return {"peak_rss_gb": round(peak_rss_mb_self() / 1024, 3)}


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _report(stage: str, **fields) -> dict:
    row = {"stage": stage, **fields}
    print(json.dumps(row), flush=True)
    return row


def model_dir(model: str) -> str:
    """``--model``: a GGUF file (converted once into the cache), or what ``model.path`` accepts."""
    if model.endswith(".gguf"):
        gguf = Path(model)
        out = cache_dir() / "models" / gguf.stem.lower()
        if out.is_dir() and verify_checkpoint(out) is None:
            return str(out)
        return str(convert_gguf(gguf, out, replace=out.is_dir()))
    return resolve_model_path(model)


def run_artifacts(run: Path) -> tuple[bytes, SafetyTokens]:
    """The steering vector (safetensors bytes) and the safety tokens of a finished run."""
    vector = run / "vector.safetensors"
    if not vector.is_file():
        raise SafeSteerError(f"--run {run}: no vector.safetensors (give the directory of a finished run)")
    return vector.read_bytes(), SafetyTokens.load(run / "safety_tokens.json")


def compose(overrides: list[str]):
    """The run config (the benchmark's composition), a bad override as one SafeSteerError line."""
    try:
        return compose_run(overrides)
    except HydraException as e:
        raise SafeSteerError(f"invalid override: {one_line(e)}") from e


def _rate(steps: list[dict]) -> float:
    """Tokens/s over the steps after the first (the first pays for allocation and warm-up)."""
    keep = steps[1:] or steps
    return sum(s["tokens"] for s in keep) / sum(s["seconds"] for s in keep)


def plain_steps(
    path: str, lcfg, batch: dict, safety, n_steps: int, device: str, seed: int, full_logits: bool = False
) -> list[dict]:
    """``n_steps`` optimizer steps of the learner's loss on ``batch`` in plain PyTorch: the same model
    dtype, autocast, micro-batches, AdamW, clipping and loss, without DeepSpeed. ``full_logits``: the
    plain way of writing it instead of the chunked head (the model's full logits, then the loss)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=lcfg.lr, betas=tuple(lcfg.betas), weight_decay=lcfg.weight_decay
    )
    ids = torch.tensor(safety.ids, device=device)
    bf16 = use_bf16(lcfg.bf16, device)
    student = LocalizedStudent(
        model, ids, lcfg.loss, lcfg.renormalize, bf16, None if full_logits else lcfg.logits_chunk
    )
    n_micro = batch["input_ids"].shape[0] // lcfg.micro_batch_size
    out = []
    for _ in range(n_steps):
        t, total = time.perf_counter(), 0.0
        opt.zero_grad(set_to_none=True)
        for mb in split(batch, n_micro):
            loss, stats = micro_batch_loss(student, mb, device)
            (loss / n_micro).backward()
            total += stats["loss_sum"]
        torch.nn.utils.clip_grad_norm_(model.parameters(), lcfg.grad_clip)
        opt.step()
        _sync(device)
        tokens = int(batch["completion_mask"].sum().item())
        out.append(
            {
                "loss": total / batch["input_ids"].shape[0],
                "tokens": tokens,
                "seconds": time.perf_counter() - t,
            }
        )
    return out


def write_profile(where: str, learner, path: str, lcfg, batch: dict, safety, device: str, seed: int) -> None:
    """torch.profiler tables (top operators by self time) of one learner step and one plain step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    parts = []
    for name, fn in (
        (f"learner step (DeepSpeed ZeRO-{lcfg.zero_stage}, one rank)", lambda: learner.train_step(batch)),
        ("plain PyTorch step", lambda: plain_steps(path, lcfg, batch, safety, 1, device, seed)),
    ):
        with profile(activities=activities) as prof:
            fn()
        parts.append(f"## {name}\n\n{prof.key_averages().table(sort_by=sort, row_limit=20)}\n")
    Path(where).write_text("\n".join(parts), encoding="utf-8")
    print(f"profile: {where}", file=sys.stderr)


@dataclass
class Workload:
    """The check's model, prompts and run artifacts."""

    cfg: Any
    path: str
    device: str
    bf16: bool
    vector_blob: bytes
    safety: SafetyTokens
    instructions: list[str]
    steer: list[bool]  # training prompts (steered) first, then anchors


def workload(args) -> Workload:
    device = default_device()
    cfg = compose(args.overrides)
    path = model_dir(args.model)
    vector_blob, safety = run_artifacts(Path(args.run))
    n = args.prompts // 2
    train = [p.instruction for p in load_prompts(cfg.data.train[0], limit=n)]
    anchors = [p.instruction for p in load_prompts(cfg.data.anchor[0], limit=n)]
    if min(len(train), len(anchors)) < n:
        raise SafeSteerError(
            f"--prompts {args.prompts}: {cfg.data.train[0]} and {cfg.data.anchor[0]} "
            f"have {len(train)} and {len(anchors)} prompts; ask for at most twice the fewer"
        )
    bf16 = device == "cuda" or args.bf16
    steer = [True] * len(train) + [False] * len(anchors)
    return Workload(cfg, path, device, bf16, vector_blob, safety, train + anchors, steer)


def generate_stage(w: Workload, max_new_tokens: int, rows: list) -> tuple[list, list, dict, object]:
    """1. The student's completions (HF generate). Returns (prompt ids, completions, the initial
    weights in bf16, the tokenizer)."""
    model, tok = load_hf(w.path, dtype="bfloat16" if w.bf16 else "float32")
    model.to(w.device)
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, w.instructions)]
    torch.manual_seed(w.cfg.seed)
    _reset_peak(w.device)
    t = time.perf_counter()
    comps = generate(model, tok, chat_texts(tok, w.instructions), max_new_tokens, do_sample=True,
                     batch_size=len(w.instructions))  # fmt: skip
    _sync(w.device)
    comps = [c or [tok.eos_token_id] for c in comps]
    tokens = sum(len(c) for c in comps)
    secs = time.perf_counter() - t
    rows.append(_report("generate", sequences=len(comps), tokens=tokens, seconds=round(secs, 3),
                        tokens_per_s=round(tokens / secs, 1), **_peak_gb(w.device)))  # fmt: skip
    base = {k: v.detach().to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}
    return prompt_ids, comps, base, tok


def teacher_stage(w: Workload, comps: list, rows: list) -> tuple[torch.Tensor, bool]:
    """2. The steered teacher under bf16 autocast; returns its log-probs and whether all are finite."""
    tcfg = dataclasses.replace(typed(w.cfg.teacher), bf16=w.bf16)
    teacher = TeacherWorker(w.path, tcfg, w.vector_blob, w.safety, OUTPUT_FOR_LOSS[w.cfg.learner.loss],
                            typed(w.cfg.model))  # fmt: skip
    teacher.score(w.instructions[:2], comps[:2], w.steer[:2])  # warm-up
    _reset_peak(w.device)
    scored = teacher.score(w.instructions, comps, w.steer)
    lp = scored["teacher"]["logprobs"]
    finite = bool(torch.isfinite(lp).all())
    tokens = sum(len(c) for c in comps)
    rows.append(_report("teacher", tokens=tokens, seconds=round(scored["seconds"], 3),
                        tokens_per_s=round(tokens / scored["seconds"], 1), finite=finite,
                        **_peak_gb(w.device)))  # fmt: skip
    return lp, finite


def learner_stage(w: Workload, args, batch: dict, rows: list) -> tuple[LearnerWorker, list[dict]]:
    """3. One ZeRO learner rank (stage 2 unless --zero-stage) takes ``--steps`` steps of the localized loss."""
    lcfg = learner_settings(w, args)
    t = time.perf_counter()
    learner = LearnerWorker(0, w.path, lcfg, "127.0.0.1", free_port(), args.steps, batch["input_ids"].shape[0],
                            w.safety, w.cfg.seed, typed(w.cfg.model))  # fmt: skip
    rows.append(_report("learner_init", seconds=round(time.perf_counter() - t, 3),
                        backend=torch.distributed.get_backend()))  # fmt: skip
    _reset_peak(w.device)
    steps = []
    for _ in range(args.steps):
        out = learner.train_step(batch)
        _sync(w.device)
        steps.append(out)
        rows.append(_report("learner_step", step=out["step"], loss=float(f"{out['loss']:.4g}"),
                            grad_norm=float(f"{out['grad_norm']:.4g}"), tokens=out["tokens"],
                            seconds=round(out["seconds"], 3),
                            tokens_per_s=round(out["tokens"] / out["seconds"], 1),
                            **_peak_gb(w.device)))  # fmt: skip
    return learner, steps


def learner_settings(w: Workload, args):
    return dataclasses.replace(typed(w.cfg.learner), world_size=1, zero_stage=args.zero_stage, bf16=w.bf16,
                               micro_batch_size=args.micro_batch_size)  # fmt: skip


def plain_stage(w: Workload, args, batch: dict, steps: list[dict], rows: list) -> None:
    """3b. The same steps in plain PyTorch (what the learner rank should reach), chunked head and full logits."""
    lcfg = learner_settings(w, args)
    plain = plain_steps(w.path, lcfg, batch, w.safety, args.steps, w.device, w.cfg.seed)
    for i, out in enumerate(plain):
        rows.append(_report("plain_step", step=i + 1, loss=float(f"{out['loss']:.4g}"), tokens=out["tokens"],
                            seconds=round(out["seconds"], 3), tokens_per_s=round(out["tokens"] / out["seconds"], 1)))  # fmt: skip
    rows.append(_report("learner_vs_plain", ratio=round(_rate(steps) / _rate(plain), 3)))
    full = plain_steps(w.path, lcfg, batch, w.safety, args.steps, w.device, w.cfg.seed, full_logits=True)
    for i, out in enumerate(full):
        rows.append(_report("plain_full_logits_step", step=i + 1, loss=float(f"{out['loss']:.4g}"),
                            seconds=round(out["seconds"], 3), tokens_per_s=round(out["tokens"] / out["seconds"], 1)))  # fmt: skip
    rows.append(_report("chunked_head_vs_full_logits", ratio=round(_rate(plain) / _rate(full), 3)))


def export_stage(learner: LearnerWorker, base: dict, rows: list) -> tuple[dict, set, bool, int]:
    """4. The learner's weight export, read back into a state dict and compared with the model."""
    t = time.perf_counter()
    blob = learner.export_weights("bfloat16")
    state = load_safetensors(blob)
    secs = time.perf_counter() - t
    expected = {k for k in base if not (learner.tied and k == "lm_head.weight")}
    shapes = all(state[k].shape == base[k].shape for k in expected & set(state))
    changed = sum(not torch.equal(state[k], base[k]) for k in expected & set(state))
    rows.append(_report("export", seconds=round(secs, 3), megabytes=round(len(blob) / 2**20, 1),
                        tensors=len(state), changed=changed))  # fmt: skip
    return state, expected, shapes, changed


def check(args) -> dict:
    w = workload(args)
    rows = [_report("setup", device=torch.cuda.get_device_name() if w.device == "cuda" else "cpu",
                    torch=torch.__version__, model=w.path, safety_ids=len(w.safety.ids))]  # fmt: skip
    prompt_ids, comps, base, tok = generate_stage(w, args.max_new_tokens, rows)
    lp, finite = teacher_stage(w, comps, rows)
    batch = collate(prompt_ids, comps, tok.pad_token_id)
    L = batch["input_ids"].shape[1]
    batch["teacher_logprobs"] = to_sequence_positions(lp, batch["prompt_lens"], batch["completion_lens"], L)
    batch["anchor"] = torch.tensor([0.0 if s else 1.0 for s in w.steer])
    batch["weight"] = torch.tensor([1.0 if s else w.cfg.trainer.anchor_weight for s in w.steer])
    learner, steps = learner_stage(w, args, batch, rows)
    plain_stage(w, args, batch, steps, rows)
    if args.profile:
        write_profile(
            args.profile, learner, w.path, learner_settings(w, args), batch, w.safety, w.device, w.cfg.seed
        )
    state, expected, shapes, changed = export_stage(learner, base, rows)
    failures = []
    if not finite:
        failures.append("teacher log-probs not finite")
    if any(s["skipped"] or not torch.isfinite(torch.tensor(s["loss"])) for s in steps):
        failures.append("a learner step was skipped or its loss not finite")
    if [s["step"] for s in steps] != list(range(1, args.steps + 1)):
        failures.append(f"learner steps {[s['step'] for s in steps]}")
    if set(state) != expected or not shapes:
        failures.append("exported keys or shapes differ from the model's")
    if changed == 0:
        failures.append("no exported weight differs from the initial model")
    return _report("verdict", ok=not failures, failures=failures, checks=len(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safesteer.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="a .gguf file, an HF model directory, default or tiny")
    ap.add_argument(
        "--run", required=True, help="a finished run on this model (vector.safetensors, safety_tokens.json)"
    )
    ap.add_argument("--prompts", type=int, default=32, help="half training prompts (steered), half anchors")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="learner optimizer steps")
    ap.add_argument("--bf16", action="store_true", help="bf16 on CPU too (always on CUDA)")
    ap.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2, 3), default=2, help="the learner rank's ZeRO stage"
    )
    ap.add_argument(
        "--profile", metavar="FILE", help="write torch.profiler tables of a learner step and a plain step"
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the run's config (key=value)")
    args = ap.parse_args(argv)
    if args.prompts < 2 or args.prompts % 2 or args.prompts % args.micro_batch_size:
        ap.error("--prompts must be even and a multiple of --micro-batch-size")
    try:
        verdict = check(args)
    except SafeSteerError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
