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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from safesteer.errors import SafeSteerError, one_line
from safesteer.schema import typed

if TYPE_CHECKING:
    from safesteer.core.tokens import SafetyTokens


def _peak_gb(device: str) -> dict:
    if device == "cuda":
        return {"peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    from safesteer.bench.common import peak_rss_mb_self

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
    from safesteer.models import convert_gguf, resolve_model_path, verify_checkpoint
    from safesteer.paths import cache_dir

    if model.endswith(".gguf"):
        gguf = Path(model)
        out = cache_dir() / "models" / gguf.stem.lower()
        if out.is_dir() and verify_checkpoint(out) is None:
            return str(out)
        return str(convert_gguf(gguf, out, replace=out.is_dir()))
    return resolve_model_path(model)


def run_artifacts(run: Path) -> tuple[bytes, SafetyTokens]:
    """The steering vector (safetensors bytes) and the safety tokens of a finished run."""
    from safesteer.core.tokens import SafetyTokens

    vector = run / "vector.safetensors"
    if not vector.is_file():
        raise SafeSteerError(f"--run {run}: no vector.safetensors (give the directory of a finished run)")
    return vector.read_bytes(), SafetyTokens.load(run / "safety_tokens.json")


def compose(overrides: list[str]):
    """The run config (the benchmark's composition), a bad override as one SafeSteerError line."""
    from hydra.errors import HydraException

    from safesteer.bench.common import compose as compose_run

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
    from transformers import AutoModelForCausalLM

    from safesteer.core.batch import split
    from safesteer.learner import LocalizedStudent, micro_batch_loss
    from safesteer.models import use_bf16

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=lcfg.lr, betas=tuple(lcfg.betas), weight_decay=lcfg.weight_decay
    )
    ids = torch.tensor(safety.ids, device=device)
    bf16 = use_bf16(lcfg.bf16, device)
    chunk = 1 << 62 if full_logits else lcfg.logits_chunk
    student = LocalizedStudent(model, ids, lcfg.loss, lcfg.renormalize, bf16, chunk)
    loss_fn = (lambda mb: _full_logits_loss(model, mb, ids, lcfg, bf16, device)) if full_logits else (
        lambda mb: micro_batch_loss(student, mb, device))  # fmt: skip
    n_micro = batch["input_ids"].shape[0] // lcfg.micro_batch_size
    out = []
    for _ in range(n_steps):
        t, total = time.perf_counter(), 0.0
        opt.zero_grad(set_to_none=True)
        for mb in split(batch, n_micro):
            loss, stats = loss_fn(mb)
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


def _full_logits_loss(model, mb: dict, ids, lcfg, bf16: bool, device: str) -> tuple[torch.Tensor, dict]:
    """The loss written the plain way: the model's (B,T,V) logits, then the localized reverse KL."""
    from safesteer.core.batch import trim
    from safesteer.core.loss import localized_reverse_kl_terms, sequence_mean
    from safesteer.core.scoring import right_padded_positions

    mb = {k: v.to(device) for k, v in trim(mb).items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits = model(
            input_ids=mb["input_ids"],
            attention_mask=mb["attention_mask"],
            position_ids=right_padded_positions(mb["attention_mask"]),
        ).logits[:, :-1]
    terms = localized_reverse_kl_terms(logits, mb["teacher_logprobs"], mb.get("teacher_ids", ids), lcfg.loss,
                                       lcfg.renormalize, target_ids=mb["input_ids"][:, 1:])  # fmt: skip
    per_seq = sequence_mean(terms, mb["completion_mask"])
    loss = (per_seq * mb["weight"]).mean() if "weight" in mb else per_seq.mean()
    return loss, {"loss_sum": per_seq.sum().item()}


def write_profile(where: str, learner, path: str, lcfg, batch: dict, safety, device: str, seed: int) -> None:
    """torch.profiler tables (top operators by self time) of one learner step and one plain step."""
    from torch.profiler import ProfilerActivity, profile

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


def check(args) -> dict:
    from safetensors.torch import load as load_safetensors

    from safesteer.cluster import free_port
    from safesteer.core.batch import collate, to_sequence_positions
    from safesteer.core.generation import chat_texts, generate
    from safesteer.data import load_prompts
    from safesteer.learner import LearnerWorker
    from safesteer.models import load_hf
    from safesteer.teacher import OUTPUT_FOR_LOSS, TeacherWorker

    device = "cuda" if torch.cuda.is_available() else "cpu"
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
    instructions, steer = train + anchors, [True] * len(train) + [False] * len(anchors)
    bf16 = device == "cuda" or args.bf16
    rows = [_report("setup", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    torch=torch.__version__, model=path, safety_ids=len(safety.ids))]  # fmt: skip

    # 1. the student's completions
    model, tok = load_hf(path, dtype="bfloat16" if bf16 else "float32")
    model.to(device)
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, instructions)]
    torch.manual_seed(cfg.seed)
    _reset_peak(device)
    t = time.perf_counter()
    comps = generate(model, tok, chat_texts(tok, instructions), args.max_new_tokens, do_sample=True,
                     batch_size=len(instructions))  # fmt: skip
    _sync(device)
    comps = [c or [tok.eos_token_id] for c in comps]
    tokens = sum(len(c) for c in comps)
    secs = time.perf_counter() - t
    rows.append(_report("generate", sequences=len(comps), tokens=tokens, seconds=round(secs, 3),
                        tokens_per_s=round(tokens / secs, 1), **_peak_gb(device)))  # fmt: skip
    base = {k: v.detach().to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}
    del model

    # 2. the steered teacher, bf16 autocast
    teacher = TeacherWorker(path, dataclasses.replace(typed(cfg.teacher), bf16=bf16), vector_blob, safety,
                            OUTPUT_FOR_LOSS[cfg.learner.loss], typed(cfg.model))  # fmt: skip
    teacher.score(instructions[:2], comps[:2], steer[:2])  # warm-up
    _reset_peak(device)
    scored = teacher.score(instructions, comps, steer)
    lp = scored["teacher"]["logprobs"]
    finite = bool(torch.isfinite(lp).all())
    rows.append(_report("teacher", tokens=tokens, seconds=round(scored["seconds"], 3),
                        tokens_per_s=round(tokens / scored["seconds"], 1), finite=finite,
                        **_peak_gb(device)))  # fmt: skip
    del teacher

    # 3. one ZeRO learner rank (stage 2 unless --zero-stage), the localized loss
    batch = collate(prompt_ids, comps, tok.pad_token_id)
    L = batch["input_ids"].shape[1]
    batch["teacher_logprobs"] = to_sequence_positions(lp, batch["prompt_lens"], batch["completion_lens"], L)
    batch["anchor"] = torch.tensor([0.0 if s else 1.0 for s in steer])
    batch["weight"] = torch.tensor([1.0 if s else cfg.trainer.anchor_weight for s in steer])
    lcfg = dataclasses.replace(typed(cfg.learner), world_size=1, zero_stage=args.zero_stage, bf16=bf16,
                               micro_batch_size=args.micro_batch_size)  # fmt: skip
    t = time.perf_counter()
    learner = LearnerWorker(
        0, path, lcfg, "127.0.0.1", free_port(), args.steps, len(comps), safety, cfg.seed, typed(cfg.model)
    )
    rows.append(_report("learner_init", seconds=round(time.perf_counter() - t, 3),
                        backend=torch.distributed.get_backend()))  # fmt: skip
    _reset_peak(device)
    steps = []
    for _ in range(args.steps):
        out = learner.train_step(batch)
        _sync(device)
        steps.append(out)
        rows.append(_report("learner_step", step=out["step"], loss=float(f"{out['loss']:.4g}"),
                            grad_norm=float(f"{out['grad_norm']:.4g}"), tokens=out["tokens"],
                            seconds=round(out["seconds"], 3),
                            tokens_per_s=round(out["tokens"] / out["seconds"], 1),
                            **_peak_gb(device)))  # fmt: skip

    # 3b. the same steps in plain PyTorch (one process, no DeepSpeed): what the learner rank should reach
    plain = plain_steps(path, lcfg, batch, safety, args.steps, device, cfg.seed)
    for i, out in enumerate(plain):
        rows.append(_report("plain_step", step=i + 1, loss=float(f"{out['loss']:.4g}"), tokens=out["tokens"],
                            seconds=round(out["seconds"], 3), tokens_per_s=round(out["tokens"] / out["seconds"], 1)))  # fmt: skip
    rows.append(_report("learner_vs_plain", ratio=round(_rate(steps) / _rate(plain), 3)))
    full = plain_steps(path, lcfg, batch, safety, args.steps, device, cfg.seed, full_logits=True)
    for i, out in enumerate(full):
        rows.append(_report("plain_full_logits_step", step=i + 1, loss=float(f"{out['loss']:.4g}"),
                            seconds=round(out["seconds"], 3), tokens_per_s=round(out["tokens"] / out["seconds"], 1)))  # fmt: skip
    rows.append(_report("chunked_head_vs_full_logits", ratio=round(_rate(plain) / _rate(full), 3)))
    if args.profile:
        write_profile(args.profile, learner, path, lcfg, batch, safety, device, cfg.seed)

    # 4. the weight export, read back into a state dict
    t = time.perf_counter()
    blob = learner.export_weights("bfloat16")
    state = load_safetensors(blob)
    secs = time.perf_counter() - t
    expected = {k for k in base if not (learner.tied and k == "lm_head.weight")}
    shapes = all(state[k].shape == base[k].shape for k in expected & set(state))
    changed = sum(not torch.equal(state[k], base[k]) for k in expected & set(state))
    rows.append(_report("export", seconds=round(secs, 3), megabytes=round(len(blob) / 2**20, 1),
                        tensors=len(state), changed=changed))  # fmt: skip

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
