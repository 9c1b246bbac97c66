#!/usr/bin/env python3
"""Batch-1 decode speed and memory-bandwidth utilisation (MBU) of llm-engine.

For each context C: one sequence of C random prompt tokens is prefilled (timed: TTFT and
prefill tok/s), then decoded greedily for --steps steps, one token per `step` request.

    bytes per step = weight bytes read (every tensor once; the embedding table only when it is
                     tied and so read whole as the LM head) + KV bytes per token x context
    MBU = bytes per step / step time / peak bandwidth

KV bytes per token come from the engine itself (info.kv_cache_bytes / num_blocks / 16), weight
bytes from config.json at the checkpoint's dtype. Step time: the median over the decode steps
(the first 3 dropped), both client round trip (what a user sees) and the engine's total_ms.

    python3 bench/engine/bench_decode.py --engine BIN --model DIR --device cuda:0 \
        --contexts 512,4096 --steps 64 --peak-bw 3.35e12 --out decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_client import EngineProcess  # noqa: E402
import models  # noqa: E402

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


def run_context(c, vocab, ctx, steps, seq_id, num_blocks):
    rng = random.Random(ctx)
    prompt = [rng.randrange(vocab) for _ in range(ctx)]
    nblk = -(-(ctx + steps + 1) // 16)
    if nblk > num_blocks:
        raise RuntimeError(f"context {ctx} needs {nblk} blocks, engine has {num_blocks}")
    table = list(range(nblk))
    samp = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    t0 = time.perf_counter()
    r = c.request("step", seqs=[{"seq_id": seq_id, "tokens": prompt, "start_pos": 0, "block_table": table, "sampling": samp}])
    prefill_s = time.perf_counter() - t0
    tok = r["outputs"][0]["token"]
    pos = ctx
    wall, eng = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        r = c.request("step", seqs=[{"seq_id": seq_id, "tokens": [tok], "start_pos": pos}])
        wall.append((time.perf_counter() - t0) * 1e3)
        eng.append(float((r.get("timings") or {}).get("total_ms", 0.0)))
        tok = r["outputs"][0]["token"]
        pos += 1
    c.request("release", seq_ids=[seq_id])
    return prefill_s, wall[3:], eng[3:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--peak-bw", type=float, help="bytes/s (datasheet); MBU omitted without it")
    ap.add_argument("--measured-bw", type=float, help="bytes/s (measured copy bandwidth), optional second MBU")
    ap.add_argument("--engine-arg", action="append", default=[])
    ap.add_argument("--log")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    eargs = []
    for x in a.engine_arg:
        eargs += x.split("=", 1) if x.startswith("--") and "=" in x else [x]
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    contexts = [int(x) for x in a.contexts.split(",")]
    res = dict(kind="decode_batch1", model=os.path.basename(a.model.rstrip("/")), device=a.device, engine_args=eargs,
               steps=a.steps, peak_bw_bytes_per_s=a.peak_bw, measured_bw_bytes_per_s=a.measured_bw, contexts={})
    with EngineProcess(a.engine, a.model, a.device, eargs, log_path=a.log) as eng:
        res["engine_startup_s"] = round(eng.startup_s, 2)
        c = eng.client()
        info = c.request("info")
        m = info["model"]
        vocab = int(m["vocab_size"])
        dbytes = DTYPE_BYTES.get(m.get("dtype"), 2)
        wb = models.bytes_read_per_decode_step(cfg, dbytes)
        kv_tok = info["kv_cache_bytes"] / info["num_blocks"] / 16
        res.update(weight_bytes_read=wb["weight_bytes_read"], num_params=wb["num_params"], checkpoint_dtype=m.get("dtype"),
                   kv_bytes_per_token=kv_tok, num_blocks=info["num_blocks"], kv_cache_bytes=info["kv_cache_bytes"])
        run_context(c, vocab, 128, 8, 1, info["num_blocks"])  # warm-up
        for i, ctx in enumerate(contexts):
            prefill_s, wall, engms = run_context(c, vocab, ctx, a.steps, 10 + i, info["num_blocks"])
            w50 = statistics.median(wall)
            e50 = statistics.median(engms) if any(engms) else None
            mean_ctx = ctx + a.steps / 2
            byts = wb["weight_bytes_read"] + kv_tok * mean_ctx
            r = dict(prefill_s=round(prefill_s, 4), prefill_tok_per_s=round(ctx / prefill_s, 1),
                     step_wall_ms_p50=round(w50, 4), step_wall_ms_min=round(min(wall), 4),
                     step_engine_ms_p50=round(e50, 4) if e50 else None,
                     decode_tok_per_s=round(1e3 / w50, 2), bytes_per_step=int(byts),
                     achieved_bw_bytes_per_s=byts / (w50 / 1e3))
            if a.peak_bw:
                r["mbu"] = round(byts / (w50 / 1e3) / a.peak_bw, 4)
                if e50:
                    r["mbu_engine_time"] = round(byts / (e50 / 1e3) / a.peak_bw, 4)
            if a.measured_bw:
                r["mbu_vs_measured_copy_bw"] = round(byts / (w50 / 1e3) / a.measured_bw, 4)
            res["contexts"][str(ctx)] = r
            print(f"[decode] {res['model']} ctx={ctx}: {r['decode_tok_per_s']} tok/s, step {w50:.3f} ms "
                  f"(engine {e50}), MBU={r.get('mbu')}, prefill {r['prefill_tok_per_s']} tok/s")
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
