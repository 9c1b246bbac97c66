#!/usr/bin/env python3
"""Logit parity checks for llm-engine.

  hf       transformers (LlamaForCausalLM with llama3 rope scaling, Qwen3ForCausalLM) vs the
           engine on the same small random checkpoints (bf16 and f32), teacher-forced: the
           last-prompt-token logits of a batched prefill (one prompt prefilled in two chunks)
           and 8 decode steps. References: HF in the checkpoint's dtype and HF in f32 (the same
           weights upcast, TF32 off), so the engine's error can be read against HF's own.
  engines  one engine (e.g. cuda:0) vs another (cpu, f32 compute) on the same checkpoints:
           teacher-forced logits, and free-running greedy tokens for 48 steps.

    python3 bench/engine/parity.py hf --engine BIN --device cuda:0 --models /tmp/bench-models --out hf.json
    python3 bench/engine/parity.py engines --engine BIN --device cuda:0 --ref-device cpu --models ... --out e.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine_client import EngineProcess  # noqa: E402
import models  # noqa: E402

PROMPT_LENS = (7, 33, 150)
NUM_DECODE = 8
CHUNK = 100  # prompts longer than this are prefilled in two steps (the first with sample=false)
GREEDY_STEPS = 48
CASES = [("small-llama", "bf16"), ("small-llama", "f32"), ("small-qwen3", "bf16"), ("small-qwen3", "f32")]


def make_inputs(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]
    conts = [[rng.randrange(vocab) for _ in range(NUM_DECODE)] for _ in PROMPT_LENS]
    return prompts, conts


def engine_args(device: str, gpu_util: float):
    if device.startswith("cuda"):
        return ["--gpu-memory-utilization", str(gpu_util), "--max-model-len", "4096"]
    return ["--kv-cache-bytes", str(64 << 20), "--max-model-len", "4096"]


def _table(n_tokens: int, first_block: int):
    n = -(-n_tokens // 16)
    return list(range(first_block, first_block + n)), first_block + n


def engine_teacher_forced(client, prompts, conts, id_base=1):
    """Returns one float32 array [len(PROMPT)+... rows] per sequence: the logits at positions
    L-1, L, ..., L+NUM_DECODE-1 (prefill's last token, then each teacher-forced token)."""
    plans, nb = [], 0
    for p, c in zip(prompts, conts):
        chunks = [(p[:CHUNK], False), (p[CHUNK:], True)] if len(p) > CHUNK else [(p, True)]
        chunks += [([t], True) for t in c]
        table, nb = _table(len(p) + len(c), nb)
        plans.append(dict(chunks=chunks, table=table, pos=0, rows=[]))
    step = 0
    while any(pl["chunks"] for pl in plans):
        seqs, live = [], []
        for i, pl in enumerate(plans):
            if not pl["chunks"]:
                continue
            toks, want = pl["chunks"].pop(0)
            d = {"seq_id": id_base + i, "tokens": toks, "start_pos": pl["pos"], "sample": want, "return_logits": want}
            if step == 0:
                d["block_table"] = pl["table"]
                d["sampling"] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
            pl["pos"] += len(toks)
            seqs.append(d)
            live.append((i, want))
        reply = client.request("step", seqs=seqs)
        for (i, want), out in zip(live, reply["outputs"]):
            if want:
                plans[i]["rows"].append(np.frombuffer(out["logits"], dtype="<f4").copy())
        step += 1
    client.request("release", seq_ids=[id_base + i for i in range(len(plans))])
    return [np.stack(pl["rows"]) for pl in plans]


def engine_greedy(client, prompts, steps=GREEDY_STEPS, id_base=100):
    nb = 0
    state = []
    for p in prompts:
        table, nb = _table(len(p) + steps, nb)
        state.append(dict(table=table, pos=0, next=list(p), out=[]))
    for s in range(steps):
        seqs = []
        for i, st in enumerate(state):
            d = {"seq_id": id_base + i, "tokens": st["next"], "start_pos": st["pos"]}
            if s == 0:
                d["block_table"] = st["table"]
                d["sampling"] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
            seqs.append(d)
        reply = client.request("step", seqs=seqs)
        for st, out, d in zip(state, reply["outputs"], seqs):
            st["pos"] += len(d["tokens"])
            st["out"].append(int(out["token"]))
            st["next"] = [int(out["token"])]
    client.request("release", seq_ids=[id_base + i for i in range(len(state))])
    return [st["out"] for st in state]


def compare(a: np.ndarray, ref: np.ndarray) -> dict:
    a = a.astype(np.float64)
    ref = ref.astype(np.float64)
    if a.shape != ref.shape:
        return dict(error=f"shape {a.shape} vs {ref.shape}")
    d = np.abs(a - ref)
    finite = bool(np.isfinite(a).all())
    scale = float(np.abs(ref).max())
    return dict(max_abs=float(d.max()), max_rel=float(d.max() / max(scale, 1e-30)),
                rel_l2=float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30)),
                top1_agree=float((a.argmax(-1) == ref.argmax(-1)).mean()), ref_max_abs=scale, finite=finite)


def compare_all(xs, refs) -> dict:
    return compare(np.concatenate(xs), np.concatenate(refs))


def ensure_small(models_dir: str):
    metas = {}
    for name, dt in CASES:
        d = os.path.join(models_dir, f"{name}-{dt}")
        metas[f"{name}/{dt}"] = models.write_small(name, dt, d)
    return metas


# ------------------------------------------------------------------------------------- hf
def hf_logits(model_dir: str, dtype: str, prompts, conts, device: str):
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    out = {}
    variants = [("native", {"bf16": torch.bfloat16, "f32": torch.float32}[dtype])]
    if dtype != "f32":
        variants.append(("f32", torch.float32))
    for tag, tdt in variants:
        # Load in the target dtype (do not .to(dtype) a loaded model: that would also round the
        # rotary inv_freq buffer to bf16, which HF does not do when it loads a bf16 checkpoint).
        model = load_hf(model_dir, tdt).to(dev).eval()
        rows = []
        with torch.no_grad():
            for p, c in zip(prompts, conts):
                ids = torch.tensor([p + c], device=dev)
                lg = model(input_ids=ids).logits[0].float()
                rows.append(lg[len(p) - 1:len(p) + len(c)].cpu().numpy())
        out[tag] = rows
        del model
    if dtype == "f32":
        out["f32"] = out["native"]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def load_hf(model_dir: str, tdt):
    import transformers

    kw = {"dtype": tdt} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": tdt}
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kw)


def run_hf(a) -> dict:
    import transformers

    res = dict(kind="hf_parity", transformers=transformers.__version__, device=a.device,
               prompt_lens=list(PROMPT_LENS), decode_steps=NUM_DECODE, prefill_chunk=CHUNK, cases={})
    res["models"] = ensure_small(a.models)
    for name, dt in CASES:
        key = f"{name}/{dt}"
        d = os.path.join(a.models, f"{name}-{dt}")
        case = {}
        try:
            vocab = models.SMALL[name]["vocab_size"]
            prompts, conts = make_inputs(vocab, seed=1)
            t0 = time.time()
            ref = hf_logits(d, dt, prompts, conts, a.device)
            case["hf_s"] = round(time.time() - t0, 2)
            with EngineProcess(a.engine, d, a.device, engine_args(a.device, a.gpu_util), log_path=a.log) as eng:
                c = eng.client()
                case["engine_info_model"] = c.request("info")["model"]
                got = engine_teacher_forced(c, prompts, conts)
            case["engine_vs_hf_f32"] = compare_all(got, ref["f32"])
            if dt != "f32":
                case["engine_vs_hf_native"] = compare_all(got, ref["native"])
                case["hf_native_vs_hf_f32"] = compare_all(ref["native"], ref["f32"])
                hf_err = case["hf_native_vs_hf_f32"]["rel_l2"]
                case["error_ratio_engine_over_hf"] = case["engine_vs_hf_f32"]["rel_l2"] / max(hf_err, 1e-30)
                tol = 3 * hf_err + 1e-3
            else:
                tol = 1e-3 if not a.device.startswith("cuda") else 3e-2  # CUDA may compute f32 weights in bf16
            case["tolerance_rel_l2"] = tol
            e = case["engine_vs_hf_f32"]
            case["pass"] = bool(e.get("finite") and e.get("rel_l2", 1) <= tol)
        except Exception as ex:  # record and go on with the next case
            case["error"] = f"{type(ex).__name__}: {ex}"
            case["traceback"] = traceback.format_exc()[-2000:]
            case["pass"] = False
        res["cases"][key] = case
        print(f"[parity hf] {key}: " + json.dumps({k: v for k, v in case.items() if k not in ("engine_info_model", "traceback")}))
    res["pass"] = all(c.get("pass") for c in res["cases"].values())
    return res


# -------------------------------------------------------------------------------- engines
def run_engines(a) -> dict:
    res = dict(kind="engine_parity", device=a.device, ref_device=a.ref_device, prompt_lens=list(PROMPT_LENS),
               decode_steps=NUM_DECODE, greedy_steps=GREEDY_STEPS, cases={})
    res["models"] = ensure_small(a.models)
    for name, dt in CASES:
        key = f"{name}/{dt}"
        d = os.path.join(a.models, f"{name}-{dt}")
        case = {}
        try:
            vocab = models.SMALL[name]["vocab_size"]
            prompts, conts = make_inputs(vocab, seed=2)
            outs = {}
            for tag, dev in (("test", a.device), ("ref", a.ref_device)):
                with EngineProcess(a.engine, d, dev, engine_args(dev, a.gpu_util), log_path=a.log) as eng:
                    c = eng.client()
                    tf = engine_teacher_forced(c, prompts, conts)
                    gr = engine_greedy(c, prompts)
                    outs[tag] = (tf, gr)
            case["teacher_forced"] = compare_all(outs["test"][0], outs["ref"][0])
            matches = []
            for g1, g2 in zip(outs["test"][1], outs["ref"][1]):
                first = next((k for k, (x, y) in enumerate(zip(g1, g2)) if x != y), len(g1))
                matches.append(first)
            case["greedy_first_divergence"] = matches
            case["greedy_all_match"] = all(m == GREEDY_STEPS for m in matches)
            tol = 3e-2  # bf16 compute vs the f32 CPU engine; an f32 checkpoint may be computed in bf16 too
            case["tolerance_rel_l2"] = tol
            tfc = case["teacher_forced"]
            case["pass"] = bool(tfc.get("finite") and tfc.get("rel_l2", 1) <= tol)
        except Exception as ex:
            case["error"] = f"{type(ex).__name__}: {ex}"
            case["traceback"] = traceback.format_exc()[-2000:]
            case["pass"] = False
        res["cases"][key] = case
        print(f"[parity engines] {key}: " + json.dumps({k: v for k, v in case.items() if k != "traceback"}))
    res["pass"] = all(c.get("pass") for c in res["cases"].values())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["hf", "engines"])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--ref-device", default="cpu")
    ap.add_argument("--models", default="/tmp/bench-models")
    ap.add_argument("--gpu-util", type=float, default=0.3)
    ap.add_argument("--log")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    t0 = time.time()
    res = run_hf(a) if a.mode == "hf" else run_engines(a)
    res["seconds"] = round(time.time() - t0, 1)
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)
    print(f"[parity {a.mode}] pass={res['pass']} in {res['seconds']} s")
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
