#!/usr/bin/env python3
"""Baseline: Hugging Face transformers `generate` on the same request set as driver.py.

Best static-batching settings: bf16, sdpa attention, static KV cache
(`cache_implementation="static"`; transformers then compiles the decode step itself unless
--compile off), requests sorted by output length (then input length) so that a batch wastes
few decode steps, inputs left-padded, batch as large as fits (256, 128, 64, ... chosen from free
memory: B x (longest input + longest output) x KV bytes/token within --mem-frac of free memory),
every batch padded to the same shape so the compiled step is reused. Output lengths are forced
with min_new_tokens = max_new_tokens = the batch's longest request; only the requested tokens
count as useful output (the rest is static batching's waste, reported too).

With --deadline-epoch the run stops before a batch that would not finish in time and reports
the completed batches as a SAMPLE (`partial: true`); its tok/s is the rate over that sample.

    python3 bench/engine/hf_bench.py --model DIR --workload nano --out hf.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402
from workloads import make_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default="nano", choices=["nano", "sharegpt", "mini"])
    ap.add_argument("--num-seqs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--mem-frac", type=float, default=0.6)
    ap.add_argument("--compile", default="auto", choices=["auto", "off"])
    ap.add_argument("--deadline-epoch", type=float, default=float(os.environ["STEP_DEADLINE_EPOCH"]) if os.environ.get("STEP_DEADLINE_EPOCH") else None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    import torch
    import transformers

    dev = torch.device(a.device)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    res = dict(kind="hf_generate", transformers=transformers.__version__, torch=torch.__version__,
               model=os.path.basename(a.model.rstrip("/")), compile=a.compile,
               settings=dict(dtype="bfloat16", attn_implementation="sdpa", cache_implementation="static",
                             sort="output length desc, then input length desc", padding="left",
                             min_new_tokens_eq_max_new_tokens=True, temperature=None))
    t_load = time.time()
    kw = {"dtype": torch.bfloat16} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa", **kw).to(dev).eval()
    res["load_s"] = round(time.time() - t_load, 1)

    vocab = cfg["vocab_size"]
    params = dict(kv.split("=", 1) for kv in a.param)
    reqs, desc = make_workload(a.workload, vocab, a.num_seqs, a.seed, params)
    res["workload"] = desc
    temp = reqs[0]["sampling"]["temperature"]
    res["settings"]["temperature"] = temp
    order = sorted(range(len(reqs)), key=lambda i: (-reqs[i]["max_tokens"], -len(reqs[i]["prompt"])))
    max_in = max(len(r["prompt"]) for r in reqs)
    max_out = max(r["max_tokens"] for r in reqs)
    kv_tok = models.kv_bytes_per_token(cfg, 2)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 8 << 30
    bsz = a.max_batch
    while bsz > 1 and bsz * (max_in + max_out) * kv_tok > a.mem_frac * free:
        bsz //= 2
    res["batch_size"] = bsz
    res["kv_cache_bytes_per_batch"] = bsz * (max_in + max_out) * kv_tok
    eos = cfg.get("eos_token_id")
    pad = 0

    def gen(batch_prompts, new_tokens):
        ids = torch.full((bsz, max_in), pad, dtype=torch.long)
        mask = torch.zeros((bsz, max_in), dtype=torch.long)
        for j, p in enumerate(batch_prompts):
            ids[j, max_in - len(p):] = torch.tensor(p)
            mask[j, max_in - len(p):] = 1
        for j in range(len(batch_prompts), bsz):  # filler rows keep the shape fixed
            ids[j, -1] = 1
            mask[j, -1] = 1
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=temp > 0,
                  cache_implementation="static", pad_token_id=pad, eos_token_id=eos)
        if temp > 0:
            kw.update(temperature=temp, top_k=0, top_p=1.0)
        if a.compile == "off":
            kw["disable_compile"] = True
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out.shape[1] - max_in

    # Warm-up at the full shape (compiles the decode step when transformers does that).
    t0 = time.time()
    try:
        gen([reqs[order[0]]["prompt"]], 4)
    except TypeError as e:  # an older transformers without disable_compile
        res["warmup_note"] = str(e)
        a.compile = "auto"
        gen([reqs[order[0]]["prompt"]], 4)
    res["warmup_s"] = round(time.time() - t0, 1)

    batches = [order[i:i + bsz] for i in range(0, len(order), bsz)]
    done_useful = done_in = done_generated = 0
    covered = 0
    per_step = None
    t_start = time.time()
    res["batches"] = []
    partial = False
    for b in batches:
        new = max(reqs[i]["max_tokens"] for i in b)
        if a.deadline_epoch and per_step is not None and time.time() + per_step * new * 1.1 > a.deadline_epoch:
            partial = True
            break
        tb = time.time()
        got = gen([reqs[i]["prompt"] for i in b], new)
        dt = time.time() - tb
        per_step = dt / new
        useful = sum(reqs[i]["max_tokens"] for i in b)
        done_useful += useful
        done_in += sum(len(reqs[i]["prompt"]) for i in b)
        done_generated += got * len(b)
        covered += len(b)
        res["batches"].append(dict(size=len(b), new_tokens=new, generated_per_row=got, seconds=round(dt, 2),
                                   useful_tokens=useful))
        print(f"[hf] batch of {len(b)}: {new} steps in {dt:.1f} s ({useful / dt:.0f} useful tok/s)", flush=True)
    elapsed = time.time() - t_start
    res.update(partial=partial, requests_covered=covered, num_requests=len(reqs), elapsed_s=round(elapsed, 2),
               output_tokens=done_useful, input_tokens=done_in, generated_tokens_incl_waste=done_generated,
               output_tok_per_s=round(done_useful / elapsed, 1) if elapsed > 0 else None,
               total_tok_per_s=round((done_useful + done_in) / elapsed, 1) if elapsed > 0 else None)
    if partial:
        res["note"] = (f"SAMPLE: {covered}/{len(reqs)} requests (the longest outputs first) finished before the "
                       "deadline; tok/s is the rate over that sample, not a full run")
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)
    print(f"[hf] {res['model']}: {res['output_tok_per_s']} useful out tok/s over {covered}/{len(reqs)} requests "
          f"in {res['elapsed_s']} s (batch {bsz}, compile {a.compile}, warm-up {res['warmup_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
