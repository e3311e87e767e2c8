/* kernels/cuda/moe_cuda.h — the CUDA kernels of one MoE layer and their
 * launchers (one .cu per operation). C API: the backend (daemon/
 * backend_cuda.c) is C and drives cuBLAS for the GEMMs in between.
 *
 * Data path of a batch of n tokens on one GPU (K = top_k, rows = n*K):
 *
 *   moe_cuda_convert_in   request rows (f32/bf16/f16, per segment) -> x [n,H]
 *                         in the model dtype, rounded as inside the model
 *   (cuBLAS)              logits [n, ld] fp32 = x · routerᵀ (+ shared gate row)
 *   moe_cuda_route        family scoring, group-limited top-k, weights
 *   moe_cuda_permute      per-expert counts, offsets, stable sort of the
 *                         (token, k) pairs by expert; gather rows -> xs [rows,H]
 *   (cuBLAS)              gu [rows, 2I] fp32 = xs · gate_upᵀ per expert
 *   moe_cuda_swiglu       h = silu(gu[:, :I]) * gu[:, I:] in the model dtype
 *   (cuBLAS)              ys [rows, H] fp32 = h · downᵀ per expert
 *   moe_cuda_combine      out[t] = Σ_k w[t,k] ys[pos[t,k]] + g[t] shared[t],
 *                         fp32, cast once to each segment's dtype
 *
 * Small batches replace the three middle steps by moe_cuda_experts_small,
 * which reads the counts on the device: no host sync in the whole batch.
 *
 * Every launcher returns the cudaError_t of the launch (as int, 0 = ok);
 * errors of the execution surface at the next synchronisation.
 * Types: `dt` values are enum moe_dtype (0 f32, 1 bf16, 2 f16).
 */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *moe_cuda_stream;

/* A run of tokens of one request inside the batch: tokens [tok0, tok0+n)
 * are at byte `boff` of the raw in/out buffers, in dtype `dt`. */
struct moe_cuda_seg {
	uint32_t tok0;
	uint32_t dt;
	uint64_t boff;
};

/* Routing parameters as the kernel reads them (copied by value). */
struct moe_cuda_route_params {
	uint32_t n_experts, top_k;
	uint32_t score;	     /* 0 softmax, 1 sigmoid (enum moe_score_fn) */
	uint32_t group;	     /* 0 none, 1 max, 2 sum of top 2 (enum moe_group_fn) */
	uint32_t n_group, topk_group;
	uint32_t renormalize;
	float renorm_eps, scale;
	int32_t round_dt;    /* round logits to this dtype first; -1: keep fp32 */
	uint32_t ld;	     /* row stride of logits (E, or E+1 with a shared gate) */
	uint32_t shared_gate; /* 1: column E holds the shared-expert gate logit */
};

/* raw (device) holds the segments' rows back to back; x gets [n, H] in
 * model dtype mdt. segs: device array of n_segs, ascending tok0. */
int moe_cuda_convert_in(moe_cuda_stream s, const void *raw, const struct moe_cuda_seg *segs,
			uint32_t n_segs, uint32_t n, uint32_t H, int mdt, void *x);

/* ids/w: [n, K], best first; bias: device [E] or NULL; gsc: [n] sigmoid of
 * the shared gate logit (only with p->shared_gate). */
int moe_cuda_route(moe_cuda_stream s, const struct moe_cuda_route_params *p, const float *logits,
		   const float *bias, uint32_t n, uint32_t *ids, float *w, float *gsc);

/* Stable counting sort of the n*K (token, k) pairs by expert, in (token, k)
 * order inside an expert (the CPU engine's order):
 *   count[x]   rows routed to expert x       off[x] first row of expert x
 *   pos[t*K+k] row of pair (t, k)            src[row] its token
 *   act[i]     the i-th expert with rows     act[E] how many have rows
 * then xs[row] = x[src[row]] (elem bytes per value). */
int moe_cuda_permute(moe_cuda_stream s, const uint32_t *ids, uint32_t n, uint32_t K, uint32_t E,
		     uint32_t *count, uint32_t *off, uint32_t *pos, uint32_t *src, uint32_t *act);
int moe_cuda_gather(moe_cuda_stream s, const void *x, const uint32_t *src, uint32_t rows,
		    size_t row_bytes, void *xs);

/* h[r, i] = silu(gu[r, i]) * gu[r, I + i] for r < rows, i < I; gu in dtype
 * gdt (fp32, or the model dtype after grouped cuBLAS GEMMs), h in mdt. */
int moe_cuda_swiglu(moe_cuda_stream s, const void *gu, int gdt, uint32_t rows, uint32_t I,
		    int mdt, void *h);

/* The front of a decode-sized batch (kernels/cuda/front_small.cu): convert
 * + router logits in one kernel (router [ld, H] in mdt, logits [n, ld]),
 * then permute in one block; the expert kernels read x through src (no
 * gather). _ok: whether H and E fit (H * 4 bytes of shared memory, E <=
 * 256); permute_small also needs n * K <= 1024. */
int moe_cuda_front_small_ok(uint32_t H, uint32_t E);
int moe_cuda_front_small(moe_cuda_stream s, const void *raw, const struct moe_cuda_seg *segs,
			 uint32_t n_segs, uint32_t n, uint32_t H, int mdt, const void *router,
			 uint32_t ld, void *x, float *logits);
int moe_cuda_permute_small(moe_cuda_stream s, const uint32_t *ids, uint32_t n, uint32_t K,
			   uint32_t E, uint32_t *count, uint32_t *off, uint32_t *pos,
			   uint32_t *src, uint32_t *act);

/* Small batches (kernels/cuda/experts_small.cu): both expert GEMMs with
 * SwiGLU fused, reading count/off on the device (no host sync). Wt: device
 * array [n_experts] of slot pointers (gate over up, then down); or Wt NULL
 * and W0 one slot over fixed_n rows from row 0 (the shared expert).
 * act: from moe_cuda_permute (the experts with rows); max_active bounds
 * act[E] (min(E, n*K)): blocks go to active experts only. max_tokens (the
 * batch's n) bounds any expert's rows: it picks the tokens per pass.
 * Row r's input is xs[src[r]] (src from the permute; NULL: xs[r]).
 * h: [rows, I] model dtype scratch, y: [rows, H] fp32. */
int moe_cuda_small_ok(int mdt, uint32_t H, uint32_t I);
int moe_cuda_experts_small(moe_cuda_stream s, int mdt, const void *const *Wt, const void *W0,
			   const uint32_t *count, const uint32_t *off, const uint32_t *act,
			   uint32_t n_experts, uint32_t max_active, uint32_t max_tokens,
			   uint32_t fixed_n, const void *xs, const uint32_t *src, uint32_t H,
			   uint32_t I, void *h, float *y);

/* out rows in each segment's dtype into raw (same layout as convert_in).
 * shy/gsc: shared expert output [n, H] and its gate [n] (NULL: none/1). */
int moe_cuda_combine(moe_cuda_stream s, const void *ys, int ydt, const uint32_t *pos, const float *w,
		     uint32_t n, uint32_t K, uint32_t H, const float *shy, const float *gsc,
		     const struct moe_cuda_seg *segs, uint32_t n_segs, void *raw);

/* Test hook: a kernel that writes to an address no allocation owns (an
 * illegal-address fault, sticky for the context). */
int moe_cuda_inject_fault(moe_cuda_stream s);

#ifdef __cplusplus
}
#endif

#endif
