#!/usr/bin/env python3
"""Run the same MoE layer as moe-bench through Hugging Face transformers' own
MoE block (OLMoE: OlmoeSparseMoeBlock, Mixtral: MixtralSparseMoeBlock) and,
optionally, through a torch._grouped_mm implementation of the same layer, and
print the median time per call for each token count.

    python3 bench/compare_torch.py [--model DIR] [--device cpu|cuda] [--impls LIST]
                                   [--threads 2] [--moe-bench build/bin/moe-bench]

Implementations (--impls, comma-separated):
  hf_eager       transformers' block, experts_implementation "eager" (the reference)
  hf_grouped_mm  transformers' block, experts_implementation "grouped_mm"
  grouped_mm     this script: router, softmax/top-k, sort by expert, offsets,
                 torch._grouped_mm for gate/up and down, silu*up, weighted
                 scatter-add (index_add_ in fp32)
Every implementation other than hf_eager is checked against hf_eager on the
same input (the first of the inputs timed at each size): printed are the
largest absolute difference and the rms of the difference, each relative to
the rms of hf_eager's output; the run fails (exit 1) when the rms ratio
exceeds --tol or the max ratio exceeds --tol-max. Both sides round to bf16
at different points (hf_eager accumulates the experts' outputs in bf16, the
grouped path in fp32), so a correct implementation shows an rms ratio of a
few 1e-3 and a max ratio of one or two bf16 steps of the largest outputs
(~0.02-0.1); a wrong one shows ratios near 1.

--device cpu (the default): times with time.perf_counter, default impls
hf_eager,hf_grouped_mm, and runs moe-bench on the same model beside it
(when the binary exists) for a speed-up column against the faster
transformers implementation at each size. Cold weights: without --layer,
every MoE layer of the checkpoint is loaded and the calls rotate over them
(as moe-bench does), so that a layer's experts leave the last-level cache
between two visits; where the other layers' experts are fewer than twice
the LLC's bytes, a buffer is read between calls to make up the rest (as
moe-bench does). Interleaved: the transformers implementations are timed,
then moe-bench, then the transformers implementations again; each keeps the
better of its two passes (on a shared machine noise only slows). Also timed:
PyTorch's own bf16 GEMM (F.linear, oneDNN) on the per-expert shape
(tokens x K / experts rows x hidden x 2 inter), the practical rate a bf16
expert GEMM reaches on this CPU. --device cuda: bf16 weights on the GPU, times
with CUDA events (median of repeated runs after a warm-up), default impls
hf_eager,hf_grouped_mm,grouped_mm; moe-bench is not run.

Besides the table, one JSON line per implementation and token count:
  {"impl": "grouped_mm", "tokens": 64, "median_ms": 0.123, "max_rel": 0.03, "rms_rel": 0.004}
(max_rel and rms_rel only where checked).

DIR is a checkpoint written by moe-mkmodel / moe-bench (config.json +
model.safetensors, or shards + model.safetensors.index.json), family olmoe
or mixtral, per-expert or fused layout; weights are used in bf16. It defaults
to moe-bench's cached synthetic OLMoE-1B-7B-shaped layer
(/tmp/moe-bench-olmoe-2048x1024x64x8-bf16-5l, 5 layers, written by moe-bench). Needs
torch, transformers (5.x: experts fused as gate_up_proj [E, 2I, H] and
down_proj [E, H, I]) and safetensors (PyPI); moed itself never needs them.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

DEFAULT = "/tmp/moe-bench-olmoe-2048x1024x64x8-bf16-5l"
IMPLS = ("hf_eager", "hf_grouped_mm", "grouped_mm")


class Checkpoint:
    """Tensors by name from model.safetensors or an index and its shards."""

    def __init__(self, model_dir):
        self.dir = model_dir
        idx = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(idx):
            self.where = json.load(open(idx))["weight_map"]
        else:
            f = safe_open(os.path.join(model_dir, "model.safetensors"), "pt")
            self.where = {k: "model.safetensors" for k in f.keys()}
        self.files = {}

    def has(self, name):
        return name in self.where

    def get(self, name):
        if name not in self.where:
            raise KeyError(f"{self.dir}: no tensor '{name}'")
        file = self.where[name]
        if file not in self.files:
            self.files[file] = safe_open(os.path.join(self.dir, file), "pt")
        return self.files[file].get_tensor(name)


def load_block(model_dir, layer, device):
    """transformers' MoE block of the checkpoint's family, bf16 on `device`,
    with layer `layer`'s weights. Returns (block, family, info dict)."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    fam = cfg["model_type"]
    H, I, K = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts_per_tok"]
    if fam == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
        E, norm = cfg["num_experts"], bool(cfg.get("norm_topk_prob", False))
        c = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E,
                        num_experts_per_tok=K, norm_topk_prob=norm, hidden_act="silu")
        cls = OlmoeSparseMoeBlock
        names = ("gate_proj", "up_proj", "down_proj")
    elif fam == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        E, norm = cfg["num_local_experts"], True  # Mixtral always renormalizes top-k
        c = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                          num_experts_per_tok=K, hidden_act="silu")
        cls = MixtralSparseMoeBlock
        names = ("w1", "w3", "w2")
    else:
        sys.exit(f"{model_dir}: model_type {fam!r}: this comparison builds olmoe or mixtral blocks")
    if cfg.get("hidden_act", "silu") != "silu":
        sys.exit(f"{model_dir}: hidden_act {cfg['hidden_act']!r}, only silu is supported")
    c._experts_implementation = "eager"
    ck = Checkpoint(model_dir)
    # Mixtral's hub layout is block_sparse_moe.experts.{e}.w1/w3/w2;
    # transformers v5 (and moe-mkmodel's fused layout) use mlp.
    blocks = [b for b in ("mlp", "block_sparse_moe") if ck.has(f"model.layers.{layer}.{b}.gate.weight")]
    if not blocks:
        sys.exit(f"{model_dir}: layer {layer} has no MoE router (model.layers.{layer}.mlp.gate.weight)")
    p = f"model.layers.{layer}.{blocks[0]}."
    bf = torch.bfloat16
    if ck.has(f"{p}experts.gate_up_proj"):
        layout = "fused"
        gu = ck.get(f"{p}experts.gate_up_proj").to(bf)
        dn = ck.get(f"{p}experts.down_proj").to(bf)
    else:
        layout = "per_expert"
        g, u, d = names
        gu = torch.stack([torch.cat([ck.get(f"{p}experts.{e}.{g}.weight"),
                                     ck.get(f"{p}experts.{e}.{u}.weight")]).to(bf) for e in range(E)])
        dn = torch.stack([ck.get(f"{p}experts.{e}.{d}.weight").to(bf) for e in range(E)])
    sd = {"gate.weight": ck.get(f"{p}gate.weight").to(bf),
          "experts.gate_up_proj": gu, "experts.down_proj": dn}
    block = cls(c).to(bf)
    block.load_state_dict(sd)
    block = block.to(device).eval()
    info = dict(family=fam, layout=layout, hidden=H, inter=I, experts=E, top_k=K, norm_topk=norm,
                config=c)
    return block, info


def grouped_mm_forward(block, info, x):
    """The same layer with torch._grouped_mm. x: [T, H] bf16 -> [T, H] bf16."""
    E, k = info["experts"], info["top_k"]
    T = x.shape[0]
    # Router as transformers computes it: bf16 logits, fp32 softmax, top-k.
    logits = F.linear(x, block.gate.weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k, dim=-1)
    if info["norm_topk"]:
        w = w / w.sum(dim=-1, keepdim=True)
    if info["family"] == "olmoe":
        w = w.to(x.dtype)  # OLMoE rounds the routing weights to the model dtype
    # (token, slot) pairs sorted by expert; offs[e] = end of expert e's rows.
    flat = idx.reshape(-1)
    sorted_e, perm = torch.sort(flat, stable=True)
    tok = perm // k
    offs = torch.searchsorted(sorted_e, torch.arange(E, device=x.device, dtype=sorted_e.dtype),
                              right=True, out_int32=True)
    xs = x[tok]
    # gate_up_proj [E, 2I, H] -> [E, H, 2I] view; down_proj [E, H, I] -> [E, I, H] view
    h = torch._grouped_mm(xs, block.experts.gate_up_proj.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    y = torch._grouped_mm(a, block.experts.down_proj.transpose(1, 2), offs=offs)
    y = y.float() * w.reshape(-1)[perm].float().unsqueeze(-1)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y)
    return out.to(x.dtype)


def make_impl(name, block, info):
    c = info["config"]
    if name in ("hf_eager", "hf_grouped_mm"):
        mode = "eager" if name == "hf_eager" else "grouped_mm"

        def run(x):
            c._experts_implementation = mode
            return block(x.unsqueeze(0)).squeeze(0)
        return run
    if name == "grouped_mm":
        return lambda x: grouped_mm_forward(block, info, x)
    raise ValueError(name)


def grouped_mm_unavailable(device):
    """None when torch._grouped_mm runs here, else the reason."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        x = torch.ones(4, 16, dtype=torch.bfloat16, device=device)
        w = torch.ones(2, 16, 16, dtype=torch.bfloat16, device=device)
        offs = torch.tensor([1, 4], dtype=torch.int32, device=device)
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not torch.all(y.float() == 16):
            return "torch._grouped_mm gave a wrong result on a probe"
    except (RuntimeError, NotImplementedError) as e:
        return f"torch._grouped_mm fails on {device.type}: {str(e).splitlines()[0]}"
    return None


def llc_bytes():
    """The last-level cache's size from sysfs (0 if unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for d in os.listdir(base) if os.path.isdir(base) else []:
        try:
            v = open(os.path.join(base, d, "size")).read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[-1:], 1)
        best = max(best, int(v.rstrip("KMG")) * mult)
    return best


EVICT = {}


def time_cpu(fns, xs, min_time, evict_bytes=0):
    """Median ms per call, rotating over the layers' fns (and the inputs);
    evict_bytes of a buffer are read between calls (untimed), as moe-bench
    does, where the other layers' experts fall short of twice the LLC."""
    L = len(fns)
    if evict_bytes and "buf" not in EVICT:
        EVICT["buf"] = torch.ones(2 * llc_bytes() // 8 + 1, dtype=torch.int64)
    for i in range(L * len(xs)):
        fns[i % L](xs[(i // L) % len(xs)])
    times, total = [], 0.0
    while len(times) < max(8, 2 * L) or total < min_time:
        k = len(times)
        fn, x = fns[k % L], xs[(k // L) % len(xs)]
        if evict_bytes:
            EVICT["buf"][:evict_bytes // 8].sum()
        t0 = time.perf_counter()
        fn(x)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return statistics.median(times) * 1e3


def gemm_rate(n, info, min_time):
    """GFLOP/s of F.linear in bf16 on the per-expert shape of n tokens
    (n * top_k / experts rows, at least 1) x hidden -> 2 * inter."""
    t = max(1, round(n * info["top_k"] / info["experts"]))
    a = torch.randn(t, info["hidden"]).to(torch.bfloat16)
    w = torch.randn(2 * info["inter"], info["hidden"]).to(torch.bfloat16)
    ms = time_cpu([lambda x: F.linear(x, w)], [a], min_time / 4)
    return t, 2.0 * t * info["hidden"] * 2 * info["inter"] / (ms * 1e-3) / 1e9


def time_cuda(fn, xs, min_time, reps, device):
    for _ in range(2):
        for x in xs:
            fn(x)
    torch.cuda.synchronize(device)
    times = []
    while len(times) < reps or sum(times) < min_time * 1e3:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(10)]
        for i, (a, b) in enumerate(ev):
            x = xs[(len(times) + i) % len(xs)]
            a.record()
            fn(x)
            b.record()
        torch.cuda.synchronize(device)
        times += [a.elapsed_time(b) for a, b in ev]
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--layer", type=int, default=None,
                    help="one MoE layer (default: every MoE layer, in rotation)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--impls", default=None,
                    help=f"comma-separated, of {','.join(IMPLS)} (default: cpu hf_eager, cuda all)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (cpu only)")
    ap.add_argument("--tokens", default=None,
                    help="token counts (default: cpu 1,4,16,64,256,1024; cuda 1,16,64,256,1024,4096)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of timed calls per size at least (default: cpu 1.0, cuda 0.2)")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per size at least (cuda)")
    ap.add_argument("--tol", type=float, default=0.02,
                    help="largest rms(diff) / rms(reference) accepted (default 0.02)")
    ap.add_argument("--tol-max", type=float, default=0.25,
                    help="largest max|diff| / rms(reference) accepted (default 0.25)")
    ap.add_argument("--moe-bench", default="build/bin/moe-bench")
    ap.add_argument("--moe-args", default="",
                    help="extra moe-bench arguments, e.g. '--isa amx'")
    a = ap.parse_args()

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"--device {a.device}: torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"--device {a.device}: only cpu and cuda are supported")
    tokens = a.tokens or ("1,16,64,256,1024,4096" if cuda else "1,4,16,64,256,1024,4096")
    tokens = [int(t) for t in tokens.split(",")]
    min_time = a.min_time if a.min_time is not None else (0.2 if cuda else 1.0)
    impls = (a.impls or ("hf_eager,hf_grouped_mm,grouped_mm" if cuda else
                         "hf_eager,hf_grouped_mm")).split(",")
    for i in impls:
        if i not in IMPLS:
            sys.exit(f"--impls: unknown implementation {i!r} (known: {', '.join(IMPLS)})")
    if not cuda:
        torch.set_num_threads(a.threads)

    if cuda:
        if device.index is None:  # "cuda": the first GPU, as moe-bench --device cuda
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)  # CUDA events record on the current device's stream
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    if a.layer is not None or cuda:
        layers = [a.layer or 0]
    else:
        ck = Checkpoint(a.model)
        layers = [l for l in range(cfg["num_hidden_layers"])
                  if any(ck.has(f"model.layers.{l}.{b}.gate.weight")
                         for b in ("mlp", "block_sparse_moe"))]
    loaded = [load_block(a.model, l, device) for l in layers]
    block, info = loaded[0]
    why = grouped_mm_unavailable(device)
    if not why and (info["hidden"] % 8 or info["inter"] % 8):
        why = (f"torch._grouped_mm needs 16-byte row strides: hidden {info['hidden']} and "
               f"inter {info['inter']} must be multiples of 8")
    if why:
        for i in ("grouped_mm", "hf_grouped_mm"):
            if i in impls:
                print(f"skipping {i}: {why}")
                impls.remove(i)
    if not impls:
        sys.exit("no implementation left to run")
    where = (torch.cuda.get_device_name(device) if cuda else f"cpu, {a.threads} threads")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {where}; "
          f"{info['family']} layers {','.join(map(str, layers))} in rotation ({info['layout']}): "
          f"hidden {info['hidden']}, "
          f"inter {info['inter']}, {info['experts']} experts top-{info['top_k']}, bf16")
    fns = {i: [make_impl(i, b, inf) for b, inf in loaded] for i in impls}

    ms = {i: {} for i in impls}
    rel = {i: {} for i in impls}
    gemm = {}
    failed = []
    g = torch.Generator().manual_seed(0)
    inputs = {n: [torch.randn(n, info["hidden"], generator=g).to(torch.bfloat16).to(device)
                  for _ in range(4)] for n in tokens}

    def torch_pass(check):
        with torch.inference_mode():
            for n in tokens:
                xs = inputs[n]
                ref = fns["hf_eager"][0](xs[0]).float() if check and "hf_eager" in impls else None
                for i in impls:
                    if ref is not None and i != "hf_eager":
                        out = fns[i][0](xs[0]).float()
                        rms = ref.pow(2).mean().sqrt().item() or 1.0
                        d = out - ref
                        rmax, rrms = d.abs().max().item() / rms, d.pow(2).mean().sqrt().item() / rms
                        rel[i][n] = (rmax, rrms)
                        ok = rrms <= a.tol and rmax <= a.tol_max  # NaN fails both
                        print(f"check {i:>14} vs hf_eager, {n:>5} tokens: max|diff|/rms {rmax:.3e}, "
                              f"rms(diff)/rms {rrms:.3e} {'ok' if ok else 'FAIL'}")
                        if not ok:
                            failed.append((i, n))
                    if cuda:
                        t = time_cuda(fns[i][0], xs, min_time, a.reps, device)
                    else:
                        # expected distinct experts per call, their bytes
                        E, K = info["experts"], info["top_k"]
                        touched = E * (1 - (1 - 1 / E) ** (n * K)) * 3 * info["hidden"] * info["inter"] * 2
                        L = len(fns[i])
                        reuse = touched * (L - 1 if L > 1 else (1 if n * K >= 4 * E else 0))
                        ev = max(0, int((2 * llc_bytes() - reuse) / L))
                        t = time_cpu(fns[i], xs, min_time, ev)
                    ms[i][n] = min(t, ms[i].get(n, t))  # the better of the passes
                    line = {"impl": i, "tokens": n, "median_ms": round(t, 6)}
                    if n in rel[i]:
                        line["max_rel"], line["rms_rel"] = (
                            float(f"{v:.3e}") if math.isfinite(v) else None for v in rel[i][n])
                    print(json.dumps(line), flush=True)
                if not cuda:
                    t_rows, rate = gemm_rate(n, info, min_time)
                    gemm[n] = (t_rows, max(rate, gemm.get(n, (0, 0))[1]))

    torch_pass(True)
    ours = {}
    if not cuda and os.path.exists(a.moe_bench):
        cmd = [a.moe_bench, "--model", a.model, "--threads", str(a.threads),
               "--tokens", ",".join(map(str, tokens))] + a.moe_args.split()
        if a.layer is not None:
            cmd += ["--layer", str(a.layer)]
        print(" ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        print(out)
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 6 and f[0].isdigit():
                try:
                    ours[int(f[0])] = (float(f[1]), float(f[5]))  # ms, GFLOP/s
                except ValueError:
                    pass
        torch_pass(False)  # the second pass, after moed
    head = f"{'tokens':>7}" + "".join(f" {i + ' ms':>17}" for i in impls)
    if ours:
        head += f" {'moed ms':>10} {'speed-up':>9} {'moed GFLOP/s':>13}"
    if gemm:
        head += f" {'torch GEMM GFLOP/s (rows)':>26}"
    print(head)
    for n in tokens:
        row = f"{n:>7}" + "".join(f" {ms[i][n]:>17.3f}" for i in impls)
        best = min(ms[i][n] for i in impls)
        if ours:
            o, rate = ours.get(n, (float("nan"), float("nan")))
            row += f" {o:>10.3f} {best / o:>8.2f}x {rate:>13.1f}"
        if gemm:
            row += f" {gemm[n][1]:>18.1f} ({gemm[n][0]:>4})"
        print(row)
    if ours:
        print(f"(speed-up: the faster of {', '.join(impls)} ms / moed ms; each side the better "
              f"of its passes; moed GFLOP/s: the whole layer's, routing included)")
    if failed:
        print(f"FAILED checks (rms ratio > {a.tol} or max ratio > {a.tol_max}): "
              + ", ".join(f"{i}@{n}" for i, n in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
