"""The chunked LM head against full logits: time and peak memory of one learner forward+backward.

    python -m safesteer.bench.head [--batch 8] [--prompt-len 64] [--completion-len 448] [--repeats 3]

Each arm runs in its own process on the same random batch (the default model, its safety-token count,
teacher log-probs drawn at random): ``full`` computes the model's (B,T,V) logits and then the
localized loss (the plain way), ``chunked`` is the learner's :class:`safesteer.core.loss.LocalizedStudent`
(``learner.logits_chunk`` positions at a time, completion positions only). The arms alternate, so a
disturbance on a shared machine hits both. Printed: the median seconds of a forward+backward, and the
peak memory of the step above what the process held before it (RSS high-water mark on CPU, reset
after the model is loaded; ``torch.cuda.max_memory_allocated`` on CUDA). One JSON line per run, then a
summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from safesteer.core.loss import LocalizedStudent, localized_reverse_kl_terms, sequence_mean
from safesteer.core.scoring import right_padded_positions
from safesteer.models import prepare_default_model


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one(arm: str, args) -> dict:
    """One forward+backward of ``arm`` in this process; returns seconds and peak step memory (MiB)."""
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(prepare_default_model()), dtype=torch.float32).to(device)
    model.config.use_cache = False
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    B, P, C = args.batch, args.prompt_len, args.completion_len
    input_ids = torch.randint(0, V, (B, P + C), generator=g).to(device)
    attention_mask = torch.ones_like(input_ids)
    completion = torch.zeros(B, P + C - 1, device=device)
    completion[:, P - 1 :] = 1
    ids = torch.randperm(V, generator=g)[: args.safety_ids].to(device)
    teacher = torch.log_softmax(torch.randn(B, P + C - 1, args.safety_ids, generator=g), -1).to(device) - 3.0
    bf16 = cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    t = time.perf_counter()
    if arm == "chunked":
        student = LocalizedStudent(model, ids, "bucket", False, bf16, args.chunk)
        per_seq, _ = student(input_ids, attention_mask, completion, teacher)
    else:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=right_padded_positions(attention_mask),
            ).logits[:, :-1]
        per_seq = sequence_mean(localized_reverse_kl_terms(logits, teacher, ids, "bucket"), completion)
    per_seq.mean().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {
        "arm": arm,
        "device": device,
        "seconds": round(seconds, 3),
        "step_peak_mib": round((peak - base) / 2**20, 1),
        "loss": round(per_seq.mean().item(), 6),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safesteer.bench.head", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="sequences (default: 8)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (default: 64)")
    ap.add_argument("--completion-len", type=int, default=448, help="completion tokens (default: 448)")
    ap.add_argument("--chunk", type=int, default=1024, help="learner.logits_chunk (default: 1024)")
    ap.add_argument("--safety-ids", type=int, default=50, help="safety-token count (default: 50)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    ap.add_argument("--arm", choices=("full", "chunked"), help=argparse.SUPPRESS)  # one run, in a child
    args = ap.parse_args(argv)
    if args.arm:
        print(json.dumps(one(args.arm, args)))
        return 0
    rows: dict[str, list[dict]] = {"full": [], "chunked": []}
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    for _ in range(args.repeats):
        for arm in rows:
            cmd = [sys.executable, "-m", "safesteer.bench.head", *passed, "--arm", arm]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"error: the {arm} run failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows[arm].append(row)
            print(json.dumps(row), flush=True)
    med = {
        a: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "step_peak_mib")}
        for a, rs in rows.items()
    }
    print(json.dumps({
        "summary": med,
        "chunked_speed_vs_full": round(med["full"]["seconds"] / med["chunked"]["seconds"], 3),
        "chunked_memory_vs_full": round(med["chunked"]["step_peak_mib"] / med["full"]["step_peak_mib"], 3),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
