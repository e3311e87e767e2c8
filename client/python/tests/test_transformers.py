"""End to end: tiny random transformers models of every family, saved with
save_pretrained, served by moed; greedy generation with their MoE blocks in
moed (moeclient.transformers.offload_moe) against transformers alone
(experts_implementation="eager").

float32: identical tokens, logits within 1e-4 x rms. bf16: moed's median
logit distance to the same weights run in float32 no larger than 1.5 x
transformers' own bf16 distance (token agreement is printed, not asserted).
"""

import os
import shutil
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moedtest  # noqa: E402
import moeclient  # noqa: E402
import moeclient.transformers as mt  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

transformers.utils.logging.disable_progress_bar()
STEPS = 8


def router_dtypes(path):
    """The dtypes of the routers ("mlp.gate.weight") of a saved checkpoint."""
    out = set()
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                for k in st.keys():
                    if k.endswith("mlp.gate.weight"):
                        out.add(str(st.get_slice(k).get_dtype()))
    return out


def tiny_config(family):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=8, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=48,
                                           shared_expert_intermediate_size=80,
                                           decoder_sparse_step=1, mlp_only_layers=[1],
                                           **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=48,
                                           decoder_sparse_step=1, norm_topk_prob=True,
                                           head_dim=16, **common)
    if family == "olmoe":
        return transformers.OlmoeConfig(num_experts=8, **common)
    ds = dict(n_routed_experts=8, moe_intermediate_size=48, n_shared_experts=1,
              first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=2,
              topk_group=1, routed_scaling_factor=1.5,
              **dict(common, num_key_value_heads=4))  # (MLA: one kv head per head)
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(topk_method="greedy", **ds)
    return transformers.DeepseekV3Config(norm_topk_prob=True, **ds)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]


def load(path, dtype):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager")
    return m.eval()


@torch.no_grad()
def greedy(model, ids, steps=STEPS):
    """Greedy continuation; returns (tokens, logits per step)."""
    out, logits = ids, []
    for _ in range(steps):
        lg = model(out).logits[:, -1, :].float()
        logits.append(lg)
        out = torch.cat([out, lg.argmax(-1, keepdim=True)], dim=1)
    return out[:, ids.shape[1]:], torch.cat(logits)


class EndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        cls.tmp = tempfile.mkdtemp(prefix="moeclient-e2e-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def family(self, family):
        torch.manual_seed(1)
        cfg = tiny_config(family)
        base = transformers.AutoModelForCausalLM.from_config(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
        paths = {}
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            p = os.path.join(self.tmp, f"{family}-{name}")
            # bf16: as a user would make it (from_pretrained(dtype=bf16) +
            # save_pretrained): DeepSeek's router stays F32
            if name == "f32":
                base.save_pretrained(p)
            else:
                load(paths["f32"], torch.bfloat16).save_pretrained(p)
            paths[name] = p
        if family.startswith("deepseek"):
            # what a real client tripped on: transformers 5.25 keeps
            # DeepSeek's router in F32 in a bf16 model, and saves it so
            self.assertEqual(router_dtypes(paths["bf16"]), {"F32"})
        ref32_tok, ref32 = greedy(load(paths["f32"], torch.float32), ids)
        res = {}
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            d = moedtest.Moed(paths[name]).wait_ready()
            try:
                with moeclient.Client(d.sock, name=f"e2e-{family}") as c:
                    alone = load(paths[name], dt)
                    tok_a, lg_a = greedy(alone, ids)
                    model = mt.offload_moe(load(paths[name], dt), c)
                    tok_m, lg_m = greedy(model, ids)
            finally:
                self.assertEqual(d.stop(), 0)
            res[name] = (tok_a, lg_a, tok_m, lg_m)
        tok_a, lg_a, tok_m, lg_m = res["f32"]
        rms = lg_a.pow(2).mean().sqrt()
        f32_err = ((lg_m - lg_a).abs().max() / rms).item()
        self.assertTrue(torch.equal(tok_a, tok_m), f"{family} f32: tokens differ")
        self.assertLess(f32_err, 1e-4, f"{family} f32 logits")
        tok_a, lg_a, tok_m, lg_m = res["bf16"]
        # the same token prefix for both (teacher forcing on ref32's tokens
        # would be stricter; greedy keeps the test honest about drift)
        d_tf = (lg_a - ref32).abs().median().item()
        d_moed = (lg_m - ref32).abs().median().item()
        agree = (tok_a == tok_m).float().mean().item()
        print(f"\n{family}: f32 tokens identical, max logit error {f32_err:.2e} x rms; "
              f"bf16 median |logit - f32|: transformers {d_tf:.4f}, moed {d_moed:.4f}; "
              f"bf16 token agreement {agree:.0%}")
        self.assertLessEqual(d_moed, 1.5 * d_tf + 1e-6, f"{family} bf16 distance")

    def test_mixtral(self):
        self.family("mixtral")

    def test_qwen2_moe(self):
        self.family("qwen2_moe")

    def test_qwen3_moe(self):
        self.family("qwen3_moe")

    def test_olmoe(self):
        self.family("olmoe")

    def test_deepseek_v2(self):
        self.family("deepseek_v2")

    def test_deepseek_v3(self):
        self.family("deepseek_v3")

    def test_mismatch_is_an_error(self):
        """offload_moe refuses a moed that serves another checkpoint."""
        torch.manual_seed(1)
        cfg = tiny_config("olmoe")
        a = transformers.AutoModelForCausalLM.from_config(cfg)
        p = os.path.join(self.tmp, "olmoe-other")
        torch.manual_seed(99)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(p)
        d = moedtest.Moed(p).wait_ready()
        try:
            with moeclient.Client(d.sock) as c:
                with self.assertRaisesRegex(ValueError, "other weights"):
                    mt.offload_moe(a.eval(), c)
                with self.assertRaisesRegex(ValueError, "dtype"):
                    mt.offload_moe(a.to(torch.bfloat16).eval(), c)
        finally:
            d.stop()


if __name__ == "__main__":
    unittest.main()
