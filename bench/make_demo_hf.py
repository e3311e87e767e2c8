#!/usr/bin/env python3
"""Writes a transformers checkpoint shaped like tools/demo.sh's demo model
(Qwen2-MoE: hidden 1024, 4 decoder layers all MoE, 32 experts top-4 with
moe_intermediate 512, a shared expert of 2048; 384 MiB of bf16 expert
weights: larger than the last-level cache), random weights, bf16, for
client/python/examples/generate.py (moed and transformers on the same
weights).

    $(tools/pyenv.sh)/bin/python bench/make_demo_hf.py OUT_DIR
"""

import sys

import torch
import transformers

out = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.Qwen2MoeConfig(
    vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
    shared_expert_intermediate_size=2048, decoder_sparse_step=1, norm_topk_prob=False,
    tie_word_embeddings=False)
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(out)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
