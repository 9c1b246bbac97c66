"""Request sets for the throughput benches (shared by driver.py and hf_bench.py; no imports
beyond the standard library)."""
from __future__ import annotations

import math
import random


def make_workload(name: str, vocab_size: int, num_seqs: int | None = None, seed: int = 0,
                  params: dict | None = None):
    """Returns (requests, description). A request: dict(prompt=[ids], max_tokens=int, sampling)."""
    p = dict(params or {})
    if name == "nano":
        # nano-vllm bench.py, verbatim order of draws: prompts first, then output lengths.
        n = num_seqs or 256
        rng = random.Random(seed)
        hi = min(10000, vocab_size - 1)
        prompts = [[rng.randint(0, hi) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
        outs = [rng.randint(100, 1024) for _ in range(n)]
        reqs = [dict(prompt=pr, max_tokens=o, sampling=dict(temperature=0.6, top_p=1.0, top_k=0, seed=i))
                for i, (pr, o) in enumerate(zip(prompts, outs))]
        desc = dict(name="nano", source="nano-vllm bench.py (random.seed(0); randint(100,1024) prompt and "
                    "output lengths; token ids randint(0,10000); temperature 0.6; ignore_eos)",
                    num_seqs=n, seed=seed)
    elif name == "sharegpt":
        # ShareGPT-like lengths: lognormal, parameters are an ASSUMPTION (see bench/engine/README.md).
        n = num_seqs or 1000
        in_median = float(p.get("in_median", 250)); in_sigma = float(p.get("in_sigma", 0.8))
        out_median = float(p.get("out_median", 200)); out_sigma = float(p.get("out_sigma", 0.8))
        in_lo, in_hi = int(p.get("in_min", 4)), int(p.get("in_max", 2048))
        out_lo, out_hi = int(p.get("out_min", 4)), int(p.get("out_max", 1024))
        rng = random.Random(seed)
        reqs = []
        for i in range(n):
            li = min(in_hi, max(in_lo, int(round(rng.lognormvariate(math.log(in_median), in_sigma)))))
            lo = min(out_hi, max(out_lo, int(round(rng.lognormvariate(math.log(out_median), out_sigma)))))
            prompt = [rng.randrange(0, vocab_size) for _ in range(li)]
            reqs.append(dict(prompt=prompt, max_tokens=lo, sampling=dict(temperature=1.0, top_p=1.0, top_k=0, seed=i)))
        desc = dict(name="sharegpt", source="synthetic ShareGPT-like lengths: lognormal (median, sigma), "
                    "clipped; an assumption, not the ShareGPT data set", num_seqs=n, seed=seed,
                    input=dict(median=in_median, sigma=in_sigma, clip=[in_lo, in_hi]),
                    output=dict(median=out_median, sigma=out_sigma, clip=[out_lo, out_hi]),
                    temperature=1.0)
    elif name == "mini":
        n = num_seqs or 16
        lo, hi = int(p.get("min_len", 10)), int(p.get("max_len", 60))
        rng = random.Random(seed)
        top = min(10000, vocab_size - 1)
        reqs = [dict(prompt=[rng.randint(0, top) for _ in range(rng.randint(lo, hi))], max_tokens=rng.randint(lo, hi),
                     sampling=dict(temperature=0.8 if i % 2 else 0.0, top_p=0.95, top_k=50 * (i % 3), seed=i))
                for i in range(n)]
        desc = dict(name="mini", num_seqs=n, seed=seed, lengths=[lo, hi])
    else:
        raise ValueError(f"unknown workload {name}")
    ins = [len(r["prompt"]) for r in reqs]
    outs = [r["max_tokens"] for r in reqs]
    desc.update(total_input_tokens=sum(ins), total_output_tokens=sum(outs),
                input_len=_dist(ins), output_len=_dist(outs))
    return reqs, desc


def _dist(xs):
    s = sorted(xs)
    return dict(min=s[0], p50=s[len(s) // 2], mean=round(sum(s) / len(s), 1), p90=s[int(0.9 * (len(s) - 1))], max=s[-1])


