#!/usr/bin/env python3
"""Greedy generation with a transformers model whose MoE blocks run in moed,
beside transformers alone; prints tokens/s for both and whether the tokens
agree.

    moed --model MODEL_DIR --socket /tmp/moed.sock &
    python client/python/examples/generate.py MODEL_DIR /tmp/moed.sock [--tokens 32]

MODEL_DIR is a transformers checkpoint (save_pretrained) of a family moed
serves; moed must serve the same directory. Without a tokenizer in MODEL_DIR
the prompt is random token ids.
"""

import argparse
import time

import torch
import transformers

import moeclient
import moeclient.transformers as mt

transformers.utils.logging.disable_progress_bar()


def generate(model, ids, n):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, ids.shape[1]:], n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("socket")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", default="The mixture of experts")
    a = ap.parse_args()
    with moeclient.Client(a.socket, connect_timeout=10) as c:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[c.model_info().dtype]
        alone = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(a.model)
            ids = tok(a.prompt, return_tensors="pt").input_ids
            if ids.numel() == 0:
                raise ValueError("empty prompt")
        except Exception:
            tok = None
            ids = torch.randint(0, alone.config.vocab_size, (1, 8),
                                generator=torch.Generator().manual_seed(0))
        ref, tps_alone = generate(alone, ids, a.tokens)
        offloaded = mt.offload_moe(
            transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval(), c)
        got, tps_moed = generate(offloaded, ids, a.tokens)
    same = (ref == got).float().mean().item()
    text = tok.decode(got[0]) if tok else got[0].tolist()
    print(f"through moed: {text}")
    print(f"tokens/s: transformers alone {tps_alone:.1f}, MoE blocks in moed {tps_moed:.1f}; "
          f"{same:.0%} of tokens identical")


if __name__ == "__main__":
    main()
