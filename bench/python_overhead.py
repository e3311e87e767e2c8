#!/usr/bin/env python3
"""Per-call overhead of the Python client against the C client, same moed,
same run: 1-token forwards on a model (default: the olmoe_f32 fixture).

    MOED_BIN_DIR=build-rel/bin $(tools/pyenv.sh)/bin/python bench/python_overhead.py

Prints the C client's p50/p99 round trip (moe-bench ipc --socket, its
"1-token forward" line) and moeclient.Client.forward's, with numpy and with
torch inputs, and the difference: the Python layer's cost per call.
"""

import os
import subprocess
import sys
import time

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "client", "python", "tests"))
sys.path.insert(0, os.path.join(here, "..", "client", "python"))
import moedtest  # noqa: E402
import moeclient  # noqa: E402

N = int(os.environ.get("COUNT", "5000"))
model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(moedtest.FIXTURES, "olmoe_f32")


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


d = moedtest.Moed(model).wait_ready()
try:
    out = subprocess.run([os.path.join(moedtest.bin_dir(), "moe-bench"), "ipc", "--socket",
                          d.sock, "--count", str(N)], capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("1-token forward"))
    c_p50, c_p99 = (float(x) for x in line.split()[-3:-1])
    rows = [("C client (moe-bench ipc)", c_p50, c_p99)]
    with moeclient.Client(d.sock, name="python-overhead") as c:
        info = c.model_info()
        L = info.moe_layers[0]
        x = np.random.default_rng(1).standard_normal((1, info.hidden)).astype(np.float32)
        outb = np.empty_like(x)
        variants = [("Python, numpy, out= given", lambda: c.forward(L, x, outb)),
                    ("Python, numpy, new output", lambda: c.forward(L, x))]
        try:
            import torch
            xt = torch.from_numpy(x.copy())
            variants.append(("Python, torch tensor", lambda: c.forward(L, xt)))
        except ImportError:
            pass
        for name, f in variants:
            for _ in range(200):
                f()
            t = []
            for _ in range(N):
                t0 = time.perf_counter_ns()
                f()
                t.append((time.perf_counter_ns() - t0) / 1e3)
            rows.append((name, pct(t, 50), pct(t, 99)))
finally:
    d.stop()

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l), "?")
print(f"# {cpu}, {os.cpu_count()} CPUs; {N} 1-token forwards each, model {os.path.basename(model)}"
      f" (hidden {info.hidden})")
print(f"{'client':32s} {'p50 us':>8s} {'p99 us':>8s} {'p50 - C':>9s}")
for name, p50, p99 in rows:
    print(f"{name:32s} {p50:8.1f} {p99:8.1f} {p50 - c_p50:+9.1f}")
