"""moeclient — run Mixture-of-Experts layers in moed from Python.

A thin, typed layer over libmoeclient.so.1 (ctypes; no compiled extension).
moed owns the experts; a client hands it hidden states through shared
memory and gets the MoE block's output back (routed + shared experts, no
residual)::

    import numpy as np, moeclient
    with moeclient.Client("/run/moed/moed.sock", connect_timeout=5.0) as c:
        info = c.model_info()
        x = np.random.randn(4, info.hidden).astype(np.float32)
        y = c.forward(info.moe_layers[0], x)

Arrays may be numpy arrays (float32, float16; bfloat16 travels as torch)
or torch tensors (float32, bfloat16, float16, on the CPU). Errors raise
MoeError, which carries the MOE_E* code (``e.code``, ``e.name``) and the
library's message.

The transformers integration is in moeclient.transformers.
"""

from ._client import (  # noqa: F401
    DTYPE_BF16,
    DTYPE_F16,
    DTYPE_F32,
    Client,
    Completion,
    ModelInfo,
    MoeError,
    Routing,
    TraceStream,
    error_name,
)

__version__ = "1.0.0"
__all__ = ["Client", "ModelInfo", "MoeError", "Routing", "Completion", "TraceStream",
           "error_name", "DTYPE_F32", "DTYPE_BF16", "DTYPE_F16"]
