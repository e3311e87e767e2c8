"""Run the MoE blocks of a transformers model in moed.

    from transformers import AutoModelForCausalLM
    import moeclient, moeclient.transformers as mt
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")
    client = moeclient.Client(sock)            # moed serving the same checkpoint
    mt.offload_moe(model, client)              # model.generate(...) now calls moed

Families: mixtral, qwen2_moe (with its shared expert), qwen3_moe, olmoe,
deepseek_v2, deepseek_v3. Dense layers are untouched. Before replacing
anything, offload_moe checks that moed serves the same shape of model
(family, layers, hidden size, experts, top-k, MoE layers, dtype) and, with
verify=True, runs a few random tokens through both on every MoE layer: a
different checkpoint is an error, not wrong numbers.
"""

from typing import List, Optional

import torch
from torch import nn

from ._client import Client

_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"}
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class MoedMoeBlock(nn.Module):
    """Stands in for a transformers MoE block: hidden states in, the block's
    output (routed + shared experts, no residual) out, computed by moed."""

    def __init__(self, client: Client, layer: int):
        super().__init__()
        self.client = client
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        dev = x.device
        if dev.type != "cpu":
            x = x.cpu()
        x = x.contiguous()
        y = self.client.forward(self.layer, x)
        return y.to(dev).view(shape)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, moed"


def _n_experts(cfg) -> Optional[int]:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        v = getattr(cfg, key, None)
        if v:
            return int(v)
    return None


def moe_layers(model) -> List[int]:
    """Indices of the decoder layers whose mlp is an MoE block."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def check_same_model(model, client: Client) -> None:
    """Raises ValueError naming every difference between the model and what
    moed serves."""
    cfg, info = model.config, client.model_info()
    layers = moe_layers(model)
    problems = []
    if cfg.model_type not in _FAMILIES:
        problems.append(f"family {cfg.model_type!r} is not one moed serves")
    if cfg.model_type != info.family:
        problems.append(f"family: model {cfg.model_type}, moed {info.family}")
    if cfg.hidden_size != info.hidden:
        problems.append(f"hidden size: model {cfg.hidden_size}, moed {info.hidden}")
    if cfg.num_hidden_layers != info.n_layers:
        problems.append(f"layers: model {cfg.num_hidden_layers}, moed {info.n_layers}")
    if _n_experts(cfg) != info.n_experts:
        problems.append(f"experts: model {_n_experts(cfg)}, moed {info.n_experts}")
    if getattr(cfg, "num_experts_per_tok", None) != info.top_k:
        problems.append(f"top-k: model {getattr(cfg, 'num_experts_per_tok', None)}, "
                        f"moed {info.top_k}")
    if tuple(layers) != tuple(info.moe_layers):
        problems.append(f"MoE layers: model {layers}, moed {list(info.moe_layers)}")
    if layers:
        p = next(model.model.layers[layers[0]].mlp.experts.parameters())
        if _DTYPES.get(p.dtype) != info.dtype:
            problems.append(f"dtype: model's experts {p.dtype}, moed {info.dtype}")
    if problems:
        raise ValueError("moed does not serve this model: " + "; ".join(problems))


@torch.no_grad()
def _verify(model, client: Client, layers: List[int], n_tokens: int = 4) -> None:
    g = torch.Generator().manual_seed(1234)
    for L in layers:
        block = model.model.layers[L].mlp
        p = next(block.parameters())
        x = torch.randn(1, n_tokens, model.config.hidden_size, generator=g).to(p.dtype)
        want = block(x.to(p.device)).float().cpu()[0]
        got = client.forward(L, x[0].contiguous()).float()
        rms = want.pow(2).mean(dim=-1).sqrt().clamp_min(1e-6)
        err = (got - want).abs().amax(dim=-1) / rms
        tol = 1e-4 if p.dtype == torch.float32 else 0.1
        # most tokens, not all: at an exact bf16 tie the two pick different
        # experts (README), a different checkpoint differs on every token
        if (err <= tol).sum().item() * 2 < n_tokens:
            raise ValueError(f"moed's output for layer {L} differs from the model's "
                             f"(max relative error {err.max().item():.3g} > {tol}): "
                             "moed serves other weights")


def offload_moe(model, client: Client, *, verify: bool = True, keep: bool = False):
    """Replaces every MoE block of `model` by a MoedMoeBlock calling `client`
    (after check_same_model and, with verify, a numeric check per layer).
    keep=False drops the original blocks (their experts' memory is freed).
    Returns the model."""
    check_same_model(model, client)
    layers = moe_layers(model)
    if verify:
        _verify(model, client, layers)
    for L in layers:
        dec = model.model.layers[L]
        new = MoedMoeBlock(client, L)
        if keep:
            new.original = dec.mlp
        dec.mlp = new
    return model
