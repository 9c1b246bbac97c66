#!/usr/bin/env python3
"""Random-weight checkpoints for the engine benches and parity checks (no downloads).

* Real shapes (`llama-3.1-8b`, `qwen3-0.6b`): config.json written from the published configs,
  safetensors written directly with torch (random normal * std for matrices, ones for norms),
  sharded like the Hub checkpoints. No transformers needed.
* Small parity models (`small-llama`, `small-qwen3`): built with transformers'
  LlamaForCausalLM / Qwen3ForCausalLM from small configs (llama3 rope scaling, GQA, explicit
  head_dim, tied embeddings on Qwen3), torch.manual_seed, norm weights perturbed so that they
  matter, then `save_pretrained` (safetensors) in bf16 or f32.

    python3 bench/engine/models.py real llama-3.1-8b /tmp/bench-models/llama-3.1-8b [--device cuda]
    python3 bench/engine/models.py small small-qwen3 bf16 /tmp/bench-models/small-qwen3-bf16
"""
from __future__ import annotations

import json
import os
import sys
import time

REAL = {
    # meta-llama/Llama-3.1-8B config.json (published values)
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16",
        initializer_range=0.02),
    # Qwen/Qwen3-0.6B config.json (published values)
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        max_position_embeddings=40960, tie_word_embeddings=True, attention_bias=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=28,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16", initializer_range=0.02),
}


def tensor_specs(cfg: dict):
    """(name, shape, kind) of every tensor of a Llama/Qwen3 checkpoint; kind: 'mat' | 'norm' | 'embed'."""
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    qwen3 = cfg["model_type"] == "qwen3"
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "embed")]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (nh * hd, h), "mat"),
            (p + "self_attn.k_proj.weight", (nkv * hd, h), "mat"),
            (p + "self_attn.v_proj.weight", (nkv * hd, h), "mat"),
            (p + "self_attn.o_proj.weight", (h, nh * hd), "mat"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, h), "mat"),
            (p + "mlp.up_proj.weight", (inter, h), "mat"),
            (p + "mlp.down_proj.weight", (h, inter), "mat"),
        ]
        if qwen3:
            specs += [(p + "self_attn.q_norm.weight", (hd,), "norm"), (p + "self_attn.k_norm.weight", (hd,), "norm")]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (cfg["vocab_size"], h), "mat"))
    return specs


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bytes_read_per_decode_step(cfg: dict, dtype_bytes: int = 2) -> dict:
    """Weight bytes a batch-1 decode step must read: every tensor once, except the embedding
    table (one row is gathered) unless it is tied, when it is read whole as the LM head."""
    total = 0
    embed = 0
    for name, shape, kind in tensor_specs(cfg):
        n = _numel(shape) * dtype_bytes
        if kind == "embed":
            embed = n
            if cfg.get("tie_word_embeddings"):
                total += n
        else:
            total += n
    params = sum(_numel(s) for _, s, _ in tensor_specs(cfg))
    return dict(weight_bytes_read=total, embedding_bytes=embed, num_params=params)


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * dtype_bytes


def write_real(name: str, out_dir: str, device: str = "cuda", std: float = 0.02, seed: int = 0,
               shard_bytes: int = 4 << 30, dtype: str = "bf16", overrides: dict | None = None) -> dict:
    """Writes config.json + model-0000i-of-0000n.safetensors (+ index) with random weights."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(REAL[name])
    cfg.update(overrides or {})
    marker = os.path.join(out_dir, ".complete")
    if os.path.exists(marker):
        return json.load(open(marker))
    os.makedirs(out_dir, exist_ok=True)
    tdtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    cfg["torch_dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    t0 = time.time()
    dev = torch.device(device if (device != "cuda" or torch.cuda.is_available()) else "cpu")
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    specs = tensor_specs(cfg)
    esize = torch.tensor([], dtype=tdtype).element_size()
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        nb = _numel(spec[1]) * esize
        if cur and cur_bytes + nb > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += nb
    shards.append(cur)
    weight_map = {}
    total = 0
    for si, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tname, shape, kind in group:
            if kind == "norm":
                t = (1.0 + 0.05 * torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)).to(tdtype)
            else:
                t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * std).to(tdtype)
            tensors[tname] = t.cpu()
            weight_map[tname] = fname
            total += t.numel() * esize
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    eos = cfg["eos_token_id"]
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos}, f)
    meta = dict(name=name, dir=out_dir, dtype=dtype, std=std, seed=seed, shards=len(shards), bytes=total,
                seconds=round(time.time() - t0, 1), **bytes_read_per_decode_step(cfg, esize))
    with open(marker, "w") as f:
        json.dump(meta, f)
    return meta


# ------------------------------------------------------------------ small transformers models
SMALL = {
    "small-llama": dict(
        arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.05),
    "small-qwen3": dict(
        arch="qwen3", vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling=None, max_position_embeddings=40960, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, initializer_range=0.05),
}


def _hf_config(name: str):
    import transformers

    spec = dict(SMALL[name])
    arch = spec.pop("arch")
    cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen3Config
    theta = spec.pop("rope_theta")
    scaling = spec.pop("rope_scaling")
    # transformers >= 5 takes rope_parameters (rope_theta inside); 4.x takes rope_theta + rope_scaling.
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        rp = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            rp = dict(scaling, rope_theta=theta)
        cfg = cls(rope_parameters=rp, **spec)
    else:
        cfg = cls(rope_theta=theta, rope_scaling=scaling, **spec)
    return cfg, arch


def legacy_config_keys(model_dir: str) -> dict:
    """Adds rope_theta / rope_scaling / torch_dtype beside transformers 5's rope_parameters / dtype
    (Hub checkpoints carry the legacy keys). Returns what it changed."""
    path = os.path.join(model_dir, "config.json")
    cfg = json.load(open(path))
    changed = {}
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in cfg:
        cfg["rope_theta"] = rp.get("rope_theta")
        changed["rope_theta"] = cfg["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        else:
            cfg["rope_scaling"] = None
        changed["rope_scaling"] = cfg["rope_scaling"]
    if "torch_dtype" not in cfg and "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
        changed["torch_dtype"] = cfg["dtype"]
    if changed:
        json.dump(cfg, open(path, "w"), indent=1)
    return changed


def write_small(name: str, dtype: str, out_dir: str, seed: int = 0) -> dict:
    import torch
    import transformers

    marker = os.path.join(out_dir, ".complete")
    if os.path.exists(marker):
        return json.load(open(marker))
    cfg, arch = _hf_config(name)
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen3ForCausalLM
    model = cls(cfg).float()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # default init is ones: perturb so the weights are tested
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    tdtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    model = model.to(tdtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    raw_cfg = json.load(open(os.path.join(out_dir, "config.json")))
    changed = legacy_config_keys(out_dir)
    meta = dict(name=name, arch=arch, dtype=dtype, dir=out_dir, seed=seed, transformers=transformers.__version__,
                saved_config_keys=sorted(raw_cfg.keys()), legacy_keys_added=changed)
    json.dump(meta, open(marker, "w"))
    return meta


def main(argv) -> int:
    if len(argv) >= 3 and argv[0] == "real":
        dev = "cuda"
        if "--device" in argv:
            dev = argv[argv.index("--device") + 1]
        print(json.dumps(write_real(argv[1], argv[2], device=dev)))
        return 0
    if len(argv) >= 4 and argv[0] == "small":
        print(json.dumps(write_small(argv[1], argv[2], argv[3])))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
