#!/usr/bin/env python3
"""Run the same MoE layer as moe-bench through Hugging Face transformers' own
MoE block (OLMoE family: OlmoeSparseMoeBlock) on the CPU and print its median
time per call for the same token counts, beside moe-bench's figures.

    python3 bench/compare_torch.py [--model DIR] [--threads 2] [--moe-bench build/bin/moe-bench]

DIR defaults to moe-bench's cached synthetic OLMoE-1B-7B-shaped layer
(/tmp/moe-bench-olmoe-2048x1024x64x8-bf16, written by moe-bench). Needs torch,
transformers and safetensors (PyPI); moed itself never needs them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import transformers
from safetensors import safe_open
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

DEFAULT = "/tmp/moe-bench-olmoe-2048x1024x64x8-bf16"


def load_block(model_dir, layer):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    assert cfg["model_type"] == "olmoe", "this comparison builds an OLMoE block"
    c = OlmoeConfig(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                    num_experts=cfg["num_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    norm_topk_prob=cfg.get("norm_topk_prob", False), hidden_act="silu")
    block = OlmoeSparseMoeBlock(c).to(torch.bfloat16).eval()
    p = f"model.layers.{layer}.mlp."
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        E = c.num_experts
        gu = torch.stack([torch.cat([f.get_tensor(f"{p}experts.{e}.gate_proj.weight"),
                                     f.get_tensor(f"{p}experts.{e}.up_proj.weight")]) for e in range(E)])
        dn = torch.stack([f.get_tensor(f"{p}experts.{e}.down_proj.weight") for e in range(E)])
        sd = {"gate.weight": f.get_tensor(f"{p}gate.weight"),
              "experts.gate_up_proj": gu, "experts.down_proj": dn}
    block.load_state_dict(sd)
    return block, c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--moe-bench", default="build/bin/moe-bench")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    block, c = load_block(a.model, a.layer)
    impl = getattr(block.experts.config if hasattr(block.experts, "config") else c,
                   "_experts_implementation", None)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{a.threads} threads, experts implementation {impl or 'default'}")
    torch_ms = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in [int(x) for x in a.tokens.split(",")]:
            xs = [torch.randn(1, n, c.hidden_size, generator=g).to(torch.bfloat16) for _ in range(4)]
            for x in xs:
                block(x)
            times, total = [], 0.0
            while len(times) < 8 or total < a.min_time:
                x = xs[len(times) % len(xs)]
                t0 = time.perf_counter()
                block(x)
                dt = time.perf_counter() - t0
                times.append(dt)
                total += dt
            torch_ms[n] = statistics.median(times) * 1e3
    ours = {}
    if os.path.exists(a.moe_bench):
        out = subprocess.run([a.moe_bench, "--model", a.model, "--threads", str(a.threads),
                              "--tokens", a.tokens], capture_output=True, text=True).stdout
        print(out)
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 2 and f[0].isdigit():
                ours[int(f[0])] = float(f[1])
    print(f"{'tokens':>7} {'transformers ms':>16} {'moed ms':>10} {'speed-up':>9}")
    for n, t in torch_ms.items():
        o = ours.get(n)
        print(f"{n:>7} {t:>16.3f} {o if o else float('nan'):>10.3f} "
              f"{(t / o) if o else float('nan'):>8.2f}x")


if __name__ == "__main__":
    sys.exit(main())
