/* moe-bench --device cuda — one MoE layer on the GPU against the GPU's
 * limits measured in the same run.
 *
 * Layers (synthetic, written once into $MOE_BENCH_CACHE or /tmp):
 *   mixtral  hidden 4096, inter 14336, 8 experts, top-2, bf16 (Mixtral-8x7B)
 *   olmoe    hidden 2048, inter 1024, 64 experts, top-8, bf16 (OLMoE-1B-7B)
 * For each token count, two medians from CUDA events on the backend's
 * stream: "kernels", the layer's device time from the input on the device
 * to the output on the device (the mid-batch host sync of the cuBLAS path
 * included), which is what PyTorch's timings of its block measure; and
 * "e2e", the same plus the copies from and to the client's pinned region
 * (the input and output buffers are page-locked here as moed pins a
 * client's region). Beside the kernel time: the bytes it must move
 * (weights of the distinct experts touched + activations in and out) next
 * to the device-to-device copy bandwidth, the bandwidth floor (distinct
 * expert bytes / copy bandwidth) and the time over it, and TFLOP/s next to
 * a cuBLAS bf16 GEMM measured now. Input sets are cycled (8 of them), so
 * each call routes to other experts: at every size the weights touched
 * are more than the L2 holds, as in a real model.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench/cuda_limits.h"
#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "kernels/cuda/device.h"
#include "tools/synth.h"

int moe_bench_cuda(const char *shape, const char *model, const char *tokens, int device,
		   double min_reps);

static int cmp_f(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return x < y ? -1 : x > y;
}

static const char *synth_model(const char *shape, char *buf, size_t n)
{
	const char *cache = getenv("MOE_BENCH_CACHE");
	struct moe_synth_opts o;
	char err[MOE_ERRLEN], probe[4200];
	struct stat st;
	bool mixtral = !strcmp(shape, "mixtral");

	moe_synth_defaults(&o, mixtral ? MOE_FAM_MIXTRAL : MOE_FAM_OLMOE);
	if (mixtral)
		o.hidden = 4096, o.inter = 14336, o.experts = 8, o.top_k = 2;
	else
		o.hidden = 2048, o.inter = 1024, o.experts = 64, o.top_k = 8;
	o.layers = 1, o.dtype = MOE_DT_BF16, o.seed = 2026;
	snprintf(buf, n, "%s/moe-bench-%s-%ux%ux%ux%u-bf16", cache ? cache : "/tmp", shape,
		 o.hidden, o.inter, o.experts, o.top_k);
	snprintf(probe, sizeof(probe), "%s/model.safetensors", buf);
	if (stat(probe, &st) == 0)
		return buf;
	fprintf(stderr, "moe-bench: writing the synthetic %s layer to %s (once)\n", shape, buf);
	if (moe_synth_write(buf, &o, err)) {
		fprintf(stderr, "moe-bench: %s\n", err);
		return NULL;
	}
	return buf;
}

static int bench_one(const char *model, const char *tokens, int device, double min_reps)
{
	struct moe_engine_opts eo = {.threads = 1, .max_batch_tokens = 4096, .backend = "cuda",
				     .device = device};
	char err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e;
	struct moe_rng r = {99};
	double copy_bw = 0, gemm = 0;
	uint32_t layer;

	moe_engine_opts_from_env(&eo); /* MOE_CUDA_GEMM etc.: the path measured */
	if (moe_model_open(model, NULL, &m, err) || moe_engine_create(m, &eo, &e, err)) {
		fprintf(stderr, "moe-bench: %s\n", err);
		return 1;
	}
	layer = m->layers[0].index;
	if (moe_cuda_copy_bw(device, (size_t)1 << 30, &copy_bw, err, sizeof(err)) ||
	    moe_cuda_gemm_tflops(device, (int)(2 * m->inter), 4096, (int)m->hidden, &gemm, err,
				 sizeof(err))) {
		fprintf(stderr, "moe-bench: measuring the GPU's limits: %s\n", err);
		return 1;
	}
	printf("moe-bench: %s layer of %s: hidden %u, inter %u, %u experts, top-%u, %s\n",
	       moe_family_name(m->family), model, m->hidden, m->inter, m->n_experts, m->top_k,
	       moe_dtype_name(m->dtype));
	printf("engine: backend %s on %s; kernels %s; expert GEMMs: %s\n", moe_engine_backend(e),
	       moe_engine_device(e), moe_engine_kernels(e),
	       getenv("MOE_CUDA_GEMM") ? getenv("MOE_CUDA_GEMM") : "auto");
	printf("limits: device-to-device copy %.0f GB/s (read + write, 1 GiB); cuBLAS bf16 GEMM "
	       "%u x 4096 x %u: %.1f TFLOP/s\n\n",
	       copy_bw, 2 * m->inter, m->hidden, gemm);
	printf("%7s %10s %10s %8s %8s %6s %9s %8s %8s %6s\n", "tokens", "kernels ms", "e2e ms",
	       "experts", "GB/s", "%copy", "floor ms", "x floor", "TFLOP/s", "%gemm");
	for (const char *p = tokens; *p;) {
		uint32_t n = (uint32_t)strtoul(p, (char **)&p, 10), K = m->top_k;
		enum { NSETS = 8, MAXR = 400 };
		uint16_t *in, *out;
		uint32_t *ids;
		float ms[MAXR], kms[MAXR];
		double distinct = 0, moved, floor_ms, flops, med, e2e;
		size_t in_bytes = ((size_t)NSETS * n * m->hidden * 2 + 4095) & ~(size_t)4095;
		size_t out_bytes = ((size_t)n * m->hidden * 2 + 4095) & ~(size_t)4095;
		int reps = 0;

		if (*p == ',')
			p++;
		if (!n || n > moe_engine_max_tokens(e))
			continue;
		in = aligned_alloc(4096, in_bytes);
		out = aligned_alloc(4096, out_bytes);
		ids = malloc((size_t)n * K * sizeof(uint32_t));
		/* page-locked, as moed pins a client's region */
		if (!in || !out || !ids || moe_engine_host_register(e, in, in_bytes, err) ||
		    moe_engine_host_register(e, out, out_bytes, err)) {
			fprintf(stderr, "moe-bench: buffers for %u tokens: %s\n", n, err);
			return 1;
		}
		for (size_t i = 0; i < (size_t)NSETS * n * m->hidden; i++)
			in[i] = moe_f32_to_bf16((float)moe_rng_normal(&r));
		for (int rep = -NSETS; rep < MAXR; rep++) {
			int set = (rep + NSETS) % NSETS;
			struct moe_epoch *ep = moe_epoch_acquire(e);
			struct moe_batch b = {layer, n, MOE_DT_BF16, in + (size_t)set * n * m->hidden,
					      out, rep < 0 ? ids : NULL, NULL, 0, NULL, NULL};

			if (moe_engine_forward(e, ep, &b, err)) {
				fprintf(stderr, "moe-bench: %s\n", err);
				return 1;
			}
			moe_epoch_release(ep);
			if (rep < 0) { /* warm-up: the experts each input set touches */
				unsigned char seen[MOE_MAX_EXPERTS] = {0};

				for (size_t i = 0; i < (size_t)n * K; i++)
					distinct += !seen[ids[i]]++ ? 1.0 / NSETS : 0;
				continue;
			}
			kms[reps] = moe_engine_last_kernel_ms(e);
			ms[reps++] = moe_engine_last_device_ms(e);
			if (reps >= min_reps && reps % NSETS == 0)
				break;
		}
		qsort(ms, reps, sizeof(float), cmp_f);
		qsort(kms, reps, sizeof(float), cmp_f);
		med = kms[reps / 2];
		e2e = ms[reps / 2];
		moved = distinct * (double)m->expert_bytes + 2.0 * n * m->hidden * 2;
		floor_ms = distinct * (double)m->expert_bytes / (copy_bw * 1e9) * 1e3;
		flops = 2.0 * n * K * 3.0 * m->inter * m->hidden + 2.0 * n * m->n_experts * m->hidden;
		printf("%7u %10.4f %10.4f %8.1f %8.0f %5.0f%% %9.4f %8.2f %8.1f %5.0f%%\n", n, med,
		       e2e, distinct, moved / (med * 1e-3) / 1e9,
		       100 * moved / (med * 1e-3) / 1e9 / copy_bw, floor_ms, med / floor_ms,
		       flops / (med * 1e-3) / 1e12, 100 * flops / (med * 1e-3) / 1e12 / gemm);
		printf("{\"impl\":\"moed\",\"shape\":\"%s\",\"gemm\":\"%s\",\"graphs\":%d,"
		       "\"tokens\":%u,\"median_ms\":%.4f,\"e2e_ms\":%.4f,\"floor_ms\":%.4f,"
		       "\"copy_gbps\":%.0f,\"gemm_tflops\":%.1f}\n",
		       moe_family_name(m->family),
		       getenv("MOE_CUDA_GEMM") ? getenv("MOE_CUDA_GEMM") : "auto",
		       !getenv("MOE_CUDA_GRAPHS") || strcmp(getenv("MOE_CUDA_GRAPHS"), "0"), n, med,
		       e2e, floor_ms, copy_bw, gemm);
		moe_engine_host_unregister(e, in);
		moe_engine_host_unregister(e, out);
		free(in), free(out), free(ids);
	}
	printf("\n");
	moe_engine_destroy(e);
	moe_model_free(m);
	return 0;
}

int moe_bench_cuda(const char *shape, const char *model, const char *tokens, int device,
		   double min_reps)
{
	char buf[4096], why[256] = "";
	int ret = 0, n = moe_cuda_device_count(why, sizeof(why));

	if (n <= device) { /* before writing gigabytes of synthetic weights */
		fprintf(stderr, "moe-bench: no GPU %d: %s\n", device,
			n < 0 ? why : "not that many CUDA devices");
		return 1;
	}
	if (!tokens)
		tokens = "1,16,64,256,1024,4096";
	if (model)
		return bench_one(model, tokens, device, min_reps);
	for (int i = 0; i < 2; i++) {
		const char *s = i ? "olmoe" : "mixtral", *dir;

		if (shape && strcmp(shape, s) && strcmp(shape, "all"))
			continue;
		dir = synth_model(s, buf, sizeof(buf));
		ret = dir ? bench_one(dir, tokens, device, min_reps) : 1;
		if (ret)
			break;
	}
	return ret;
}
