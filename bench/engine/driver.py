#!/usr/bin/env python3
"""Continuous-batching driver for llm-engine: offline throughput workloads over the protocol.

A compact Python port of src/runtime/SchedulerCore.ts + KvBlockManager.ts (vLLM v1-style):
paged blocks of 16, running sequences first (one decode token each, or the rest of a chunked
prefill), then admission of waiting sequences while blocks and the per-step token budget
(`max_num_batched_tokens`) allow; preemption by recompute of the latest-arrived running
sequence when blocks run out; finished ids go out in the next step's `release`.
EOS is ignored (every request generates exactly its `max_tokens`), as in nano-vllm's bench.

    python3 bench/engine/driver.py --engine engine/build/llm-engine --model DIR \
        --device cuda:0 --workload nano --out /tmp/w2.json [--engine-arg=--gpu-memory-utilization=0.9]

Workloads: `nano` (nano-vllm bench.py: 256 seqs, prompt and output lengths uniform in
[100, 1024], random.seed(0)), `sharegpt` (lognormal lengths, see make_workload), `mini`.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_client import CODEC, Client, EngineProcess  # noqa: E402
from workloads import make_workload  # noqa: E402

BLOCK_SIZE = 16


# ----------------------------------------------------------------------------- scheduler
class Seq:
    __slots__ = ("id", "tokens", "prompt_len", "max_tokens", "sampling", "arrival", "num_computed",
                 "num_out", "blocks", "engine_knows", "blocks_sent", "t_first", "t_done", "num_preempted")

    def __init__(self, sid, prompt, max_tokens, sampling, arrival):
        self.id = sid
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.arrival = arrival
        self.num_computed = 0
        self.num_out = 0
        self.blocks = []
        self.engine_knows = False
        self.blocks_sent = 0
        self.t_first = None
        self.t_done = None
        self.num_preempted = 0


def _arrival(s: Seq) -> int:
    return s.arrival


class Scheduler:
    """SchedulerCore.ts (one priority class, so priority order = arrival order) + KvBlockManager.ts."""

    def __init__(self, num_blocks: int, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int):
        self.free = list(range(num_blocks - 1, -1, -1))  # pop from the end: lowest ids first
        self.num_blocks = num_blocks
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self.pending_release: list[int] = []
        self.finished: list[Seq] = []
        self.num_preemptions = 0
        self._arrivals = 0

    # -- KvBlockManager
    def _allocate(self, seq: Seq, num_tokens: int) -> bool:
        need = -(-num_tokens // BLOCK_SIZE) - len(seq.blocks)
        if need <= 0:
            return True
        free = self.free
        if need > len(free):
            return False
        new = free[-need:]
        del free[-need:]
        new.reverse()
        seq.blocks.extend(new)
        return True

    def _release_blocks(self, seq: Seq) -> None:
        self.free.extend(reversed(seq.blocks))
        seq.blocks = []

    # -- SchedulerCore
    def add(self, sid, prompt, max_tokens, sampling) -> Seq:
        n = len(prompt)
        if n == 0 or n >= self.max_model_len or -(-(n + 1) // BLOCK_SIZE) > self.num_blocks:
            raise ValueError(f"request {sid} cannot fit (prompt {n})")
        seq = Seq(sid, prompt, max_tokens, sampling, self._arrivals)
        self._arrivals += 1
        bisect.insort(self.waiting, seq, key=_arrival)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self):
        """Returns (items for the wire, plan entries (seq, start, n, sample), num tokens) or None."""
        wire, plan = [], []
        budget = self.budget
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = len(seq.tokens) - seq.num_computed
            if n > budget:
                n = budget
            if n <= 0:
                i += 1
                continue
            fits = self._allocate(seq, seq.num_computed + n)
            while not fits:
                victim = running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                fits = self._allocate(seq, seq.num_computed + n)
            if not fits:
                break
            self._item(seq, n, wire, plan)
            budget -= n
            i += 1
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                seq = waiting[0]
                n = len(seq.tokens) - seq.num_computed
                if n > budget:
                    n = budget
                if not self._allocate(seq, seq.num_computed + n):
                    break
                waiting.pop(0)
                if not running or running[-1].arrival < seq.arrival:
                    running.append(seq)
                else:
                    bisect.insort(running, seq, key=_arrival)
                self._item(seq, n, wire, plan)
                budget -= n
        if not plan:
            return None
        return wire, plan, self.budget - budget

    def take_release(self) -> list:
        r = self.pending_release
        self.pending_release = []
        return r

    def _item(self, seq: Seq, n: int, wire: list, plan: list) -> None:
        start = seq.num_computed
        end = start + n
        sample = end == len(seq.tokens)
        toks = seq.tokens[start:end]
        if not seq.engine_knows:
            seq.engine_knows = True
            d = {"seq_id": seq.id, "tokens": toks, "start_pos": start, "block_table": list(seq.blocks),
                 "sampling": seq.sampling}
        elif len(seq.blocks) > seq.blocks_sent:
            d = {"seq_id": seq.id, "tokens": toks, "start_pos": start, "new_blocks": seq.blocks[seq.blocks_sent:]}
        else:
            d = {"seq_id": seq.id, "tokens": toks, "start_pos": start}
        seq.blocks_sent = len(seq.blocks)
        if not sample:
            d["sample"] = False
        wire.append(d)
        plan.append((seq, start, n, sample))

    def apply(self, plan, outputs, now: float) -> int:
        """Applies a step reply (outputs in plan order). Returns the number of tokens sampled."""
        sampled = 0
        for (seq, start, n, sample), out in zip(plan, outputs):
            if seq.num_computed != start:  # cancelled/preempted while in flight: void
                continue
            seq.num_computed = start + n
            if not sample:
                continue
            tok = out.get("token")
            if tok is None:
                continue
            seq.tokens.append(tok)
            seq.num_out += 1
            sampled += 1
            if seq.num_out == 1:
                seq.t_first = now
            if seq.num_out >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.t_done = now
                self._finish(seq)
        return sampled

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self._release_blocks(seq)
        if seq.engine_knows:
            self.pending_release.append(seq.id)
        seq.engine_knows = False
        seq.blocks_sent = 0
        seq.num_computed = 0
        seq.num_preempted += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_arrival)

    def _finish(self, seq: Seq) -> None:
        try:
            self.running.remove(seq)
        except ValueError:
            self.waiting.remove(seq)
        self._release_blocks(seq)
        if seq.engine_knows:
            self.pending_release.append(seq.id)
        self.finished.append(seq)

    def abort_all(self) -> None:
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq)


# ----------------------------------------------------------------------------- run loop
def run_workload(client: Client, requests, *, max_num_batched_tokens=8192, max_num_seqs=256,
                 deadline: float | None = None, id_base: int = 1, info=None):
    info = info or client.request("info")
    num_blocks = int(info["num_blocks"])
    max_model_len = int(info["model"]["max_position_embeddings"])
    sched = Scheduler(num_blocks, max_num_batched_tokens, max_num_seqs, max_model_len)
    seqs = [sched.add(id_base + i, r["prompt"], r["max_tokens"], r["sampling"]) for i, r in enumerate(requests)]

    steps = []  # (num_seqs, num_tokens, wall_ms, engine_total_ms, engine_forward_ms, driver_ms)
    partial = False
    t_start = time.perf_counter()
    while sched.has_work:
        if deadline is not None and time.time() > deadline:
            partial = True
            break
        t0 = time.perf_counter()
        planned = sched.schedule()
        if planned is None:
            raise RuntimeError("scheduler stalled: work left but nothing schedulable")
        wire, plan, ntok = planned
        release = sched.take_release()
        body = {"seqs": wire}
        if release:
            body["release"] = release
        t1 = time.perf_counter()
        reply = client.request("step", **body)
        t2 = time.perf_counter()
        sched.apply(plan, reply["outputs"], t2 - t_start)
        t3 = time.perf_counter()
        tm = reply.get("timings") or {}
        enc, dec = client.last_encode_s, client.last_decode_s
        steps.append((len(wire), ntok, (t3 - t0) * 1e3, float(tm.get("total_ms", 0.0)), float(tm.get("forward_ms", 0.0)),
                      ((t1 - t0) + (t3 - t2) + enc + dec) * 1e3))
    elapsed = time.perf_counter() - t_start
    if partial:
        sched.abort_all()
    release = sched.take_release()
    if release:
        client.request("release", seq_ids=release)
    end_info = client.request("info")

    done = [s for s in seqs if s.t_done is not None]
    wrong = [s.id for s in done if s.num_out != s.max_tokens]
    out_tokens = sum(s.num_out for s in seqs)
    in_tokens = sum(s.prompt_len for s in seqs if s.num_out > 0)
    wall = [x[2] for x in steps]
    eng = [x[3] for x in steps]
    drv = [x[5] for x in steps]
    decode_only = [x for x in steps if x[1] == x[0]]  # every sequence contributed one token
    res = dict(
        partial=partial,
        num_requests=len(seqs), num_finished=len(done),
        wrong_length_ids=wrong[:20], num_wrong_length=len(wrong),
        elapsed_s=round(elapsed, 3),
        output_tokens=out_tokens, input_tokens_of_started=in_tokens,
        output_tok_per_s=round(out_tokens / elapsed, 1) if elapsed > 0 else None,
        total_tok_per_s=round((out_tokens + in_tokens) / elapsed, 1) if elapsed > 0 else None,
        num_steps=len(steps), num_preemptions=sched.num_preemptions,
        batched_tokens=sum(x[1] for x in steps),
        mean_seqs_per_step=round(statistics.fmean(x[0] for x in steps), 1) if steps else 0,
        step_wall_ms=_ms(wall), engine_total_ms=_ms(eng),
        decode_only_steps=dict(count=len(decode_only), wall_ms=_ms([x[2] for x in decode_only]),
                               mean_batch=round(statistics.fmean(x[0] for x in decode_only), 1) if decode_only else 0),
        driver_overhead_ms=_ms(drv),
        driver_overhead_frac=round(sum(drv) / max(1e-9, sum(wall)), 4),
        ipc_and_engine_idle_ms_per_step=round((sum(wall) - sum(drv) - sum(eng)) / max(1, len(steps)), 3),
        ttft_s=_ms([s.t_first for s in seqs if s.t_first is not None]),
        end_info=dict(num_used_blocks=end_info.get("num_used_blocks"), num_active_seqs=end_info.get("num_active_seqs"),
                      num_blocks=end_info.get("num_blocks")),
        limits=dict(num_blocks=num_blocks, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len),
        codec=CODEC,
        outputs_sha1=hashlib.sha1(json.dumps([s.tokens[s.prompt_len:] for s in seqs]).encode()).hexdigest(),
    )
    res["ok"] = (not partial and len(done) == len(seqs) and not wrong and end_info.get("num_used_blocks") == 0
                 and end_info.get("num_active_seqs") == 0)
    return res


def _ms(xs):
    if not xs:
        return None
    s = sorted(xs)
    return dict(mean=round(statistics.fmean(s), 3), p50=round(s[len(s) // 2], 3), p90=round(s[int(0.9 * (len(s) - 1))], 3),
                p99=round(s[int(0.99 * (len(s) - 1))], 3), max=round(s[-1], 3))


def warmup(client: Client, info, vocab_size: int) -> None:
    rng = random.Random(123)
    reqs = [dict(prompt=[rng.randrange(vocab_size) for _ in range(32 + 16 * i)], max_tokens=4,
                 sampling=dict(temperature=0.0, top_p=1.0, top_k=0, seed=0)) for i in range(8)]
    r = run_workload(client, reqs, id_base=10_000_000, info=info)
    if not r["ok"]:
        raise RuntimeError(f"warm-up failed: {r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine-arg", action="append", default=[],
                    help="extra engine flag, e.g. --engine-arg=--gpu-memory-utilization=0.9 (split at the first '=' "
                         "after the flag name)")
    ap.add_argument("--workload", default="mini", choices=["nano", "sharegpt", "mini"])
    ap.add_argument("--num-seqs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], help="workload parameter key=value")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--deadline-epoch", type=float, default=float(os.environ["STEP_DEADLINE_EPOCH"]) if os.environ.get("STEP_DEADLINE_EPOCH") else None, help="stop (partial result) at this time.time()")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--log", help="engine stderr log file")
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args(argv)

    eargs = []
    for x in a.engine_arg:
        if x.startswith("--") and "=" in x:
            k, v = x.split("=", 1)
            eargs += [k, v]
        else:
            eargs.append(x)
    params = dict(kv.split("=", 1) for kv in a.param)
    result = dict(workload=None, device=a.device, model=a.model, engine_args=eargs)
    t0 = time.time()
    with EngineProcess(a.engine, a.model, a.device, eargs, log_path=a.log) as eng:
        result["engine_startup_s"] = round(eng.startup_s, 2)
        c = eng.client()
        info = c.request("info")
        result["info"] = {k: info.get(k) for k in ("model", "device", "num_blocks", "kv_cache_bytes", "block_size")}
        vocab = int(info["model"]["vocab_size"])
        reqs, desc = make_workload(a.workload, vocab, a.num_seqs, a.seed, params)
        result["workload"] = desc
        if not a.no_warmup:
            warmup(c, info, vocab)
        result["run"] = run_workload(c, reqs, max_num_batched_tokens=a.max_num_batched_tokens,
                                     max_num_seqs=a.max_num_seqs, deadline=a.deadline_epoch, info=info)
    result["wall_s"] = round(time.time() - t0, 2)
    txt = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(txt)
    r = result["run"]
    print(f"[driver] {a.workload}: ok={r['ok']} partial={r['partial']} {r['output_tokens']} out tok in {r['elapsed_s']} s "
          f"= {r['output_tok_per_s']} out tok/s ({r['total_tok_per_s']} total); steps={r['num_steps']} "
          f"preemptions={r['num_preemptions']} driver overhead/step p50={r['driver_overhead_ms']['p50']} ms "
          f"({100 * r['driver_overhead_frac']:.2f}% of wall); end used blocks={r['end_info']['num_used_blocks']}")
    return 0 if r["ok"] or r["partial"] else 1


if __name__ == "__main__":
    sys.exit(main())
