/* tests/test_cuda.c — the CUDA backend (ctest label gpu).
 *
 * Skips (exit 77, "SKIPPED: ...") when moed was built without CUDA or no
 * GPU is usable, so that CI without a GPU reports it skipped. On a GPU:
 *   - every transformers fixture through the CUDA engine: the same top-k
 *     experts as transformers, routing weights within 1e-5, and the
 *     model-dtype output within the CPU suite's tolerance of transformers'
 *     (bf16 5e-2·rms + 1 ulp, f16 8e-3·rms, f32 1e-4·rms);
 *   - the CUDA engine against the CPU engine on random inputs: fp32
 *     requests within 2e-2·rms (bf16 models: the GPU rounds the SwiGLU
 *     output to bf16 before the down GEMM, as transformers does; the CPU
 *     keeps it fp32; the grouped path also rounds both GEMM outputs, so
 *     it gets the 5e-2·rms it has against transformers), 1e-4·rms for f32
 *     models;
 *   - every way of running the experts (MOE_CUDA_GEMM=cublas: per-expert
 *     cuBLAS GEMMs after a host sync; =grouped: one grouped cuBLAS call per
 *     GEMM, output in the model dtype; =small: the kernels that read the
 *     counts on the device) for each of the above;
 *   - small batches (1-64 tokens) replayed from CUDA graphs, three times
 *     each on fresh inputs split into other requests, against the CPU
 *     engine; and the same without graphs (MOE_CUDA_GRAPHS=0), with the
 *     fused front of small batches (the default) and without it
 *     (MOE_CUDA_FUSED=0); the layer's kernel time is measured and within
 *     the end-to-end time;
 *   - a batch of segments in several dtypes against the same requests run
 *     one by one on the GPU;
 *   - moed serving on the GPU (devices: [0]): outputs against the CPU
 *     engine, status naming the GPU;
 *   - `test_cuda fault` (a separate ctest test, a fresh process since a
 *     sticky error poisons the CUDA context): an injected illegal access
 *     fails the batch with -ENOTRECOVERABLE and every later one; and moed
 *     with the same injection answers its clients MOE_EDEVICE and exits 3.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "tests/daemon_harness.h"

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "formats/safetensors.h"
#include "kernels/cpu/convert.h"
#include "tools/synth.h"
#ifdef MOE_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

static const char *const fixtures[] = {
	"mixtral_bf16",	    "mixtral_f32_fused", "qwen2_moe_bf16",	  "qwen3_moe_f16_sharded",
	"olmoe_f32",	    "olmoe_bf16_norm",	 "deepseek_v2_bf16",	  "deepseek_v3_bf16",
	"deepseek_v3_f32_fused", "deepseek_v2_group_limited_f32",
	/* bf16 checkpoints made by from_pretrained(dtype=bf16) + save_pretrained
	 * with transformers 5.25: DeepSeek's router written F32 */
	"deepseek_v2_bf16_f32router", "deepseek_v3_bf16_f32router",
};

static double tol_atol(enum moe_dtype dt)
{
	return dt == MOE_DT_BF16 ? 5e-2 : dt == MOE_DT_F16 ? 8e-3 : 1e-4;
}

static double tol_rtol(enum moe_dtype dt)
{
	return dt == MOE_DT_BF16 ? 1.0 / 256 : dt == MOE_DT_F16 ? 1.0 / 1024 : 1e-5;
}

static struct moe_engine *open_on(const char *dir, const char *backend, uint32_t max_tokens,
				  struct moe_model **mp)
{
	struct moe_engine_opts o = {.threads = 2, .max_batch_tokens = max_tokens,
				    .backend = backend, .device = 0};
	struct moe_engine *e;
	char err[MOE_ERRLEN];

	if (moe_model_open(dir, NULL, mp, err))
		fail_msg("%s", err);
	moe_engine_opts_from_env(&o); /* the MOE_CUDA_* the test set, as moed reads them */
	if (moe_engine_create(*mp, &o, &e, err))
		fail_msg("%s engine on %s: %s", backend, dir, err);
	return e;
}

static int fwd(struct moe_engine *e, uint32_t layer, enum moe_dtype dt, const void *in, void *out,
	       uint32_t n, uint32_t *ids, float *w, char *err)
{
	struct moe_epoch *ep = moe_epoch_acquire(e);
	struct moe_batch b = {layer, n, dt, in, out, ids, w, 0, NULL, NULL};
	int ret = moe_engine_forward(e, ep, &b, err);

	moe_epoch_release(ep);
	return ret;
}

static void fwd_ok(struct moe_engine *e, uint32_t layer, enum moe_dtype dt, const void *in,
		   void *out, uint32_t n, uint32_t *ids, float *w)
{
	char err[MOE_ERRLEN];

	if (fwd(e, layer, dt, in, out, n, ids, w, err))
		fail_msg("forward: %s", err);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* ---- the transformers fixtures on the GPU ------------------------------ */

static const char *const gemm_modes[] = {"cublas", "small", "grouped"};

/* The CUDA engine with MOE_CUDA_GEMM=mode, or NULL (printed) when this
 * cuBLAS has no grouped GEMM for the model's dtype. */
static struct moe_engine *open_mode(const char *dir, const char *mode, uint32_t max_tokens,
				    struct moe_model **mp)
{
	struct moe_engine_opts o = {.threads = 2, .max_batch_tokens = max_tokens,
				    .backend = "cuda", .device = 0};
	struct moe_engine *e = NULL;
	char err[MOE_ERRLEN];
	int ret;

	if (moe_model_open(dir, NULL, mp, err))
		fail_msg("%s", err);
	setenv("MOE_CUDA_GEMM", mode, 1);
	moe_engine_opts_from_env(&o);
	ret = moe_engine_create(*mp, &o, &e, err);
	unsetenv("MOE_CUDA_GEMM");
	if (ret && !strcmp(mode, "grouped") && strstr(err, "refuses")) {
		printf("skipped: %s\n", err);
		moe_model_free(*mp);
		return NULL;
	}
	if (ret)
		fail_msg("cuda engine (%s) on %s: %s", mode, dir, err);
	return e;
}

static void fixtures_in(const char *mode)
{
	for (size_t f = 0; f < sizeof(fixtures) / sizeof(fixtures[0]); f++) {
		char dir[1024], ref[1100], err[MOE_ERRLEN], key[160];
		struct moe_st_file *rf;
		struct moe_model *m;
		struct moe_engine *e;

		snprintf(dir, sizeof(dir), "%s/%s", MOE_FIXTURES_DIR, fixtures[f]);
		snprintf(ref, sizeof(ref), "%s/reference.safetensors", dir);
		e = open_mode(dir, mode, 64, &m);
		if (!e)
			return;
		if (moe_st_open(ref, &rf, err))
			fail_msg("%s", err);
		for (uint32_t l = 0; l < m->n_moe_layers; l++) {
			uint32_t L = m->layers[l].index, H = m->hidden, K = m->top_k, n;
			size_t ni, no, nid, nw, differ = 0;
			double *in, *out_hf, *fid, *fw, *y;
			uint32_t *ids;
			float *w, *in32;
			void *in_m, *out_m;

			snprintf(key, sizeof(key), "layers.%u.input", L);
			in = tu_read_f64(rf, key, &ni);
			snprintf(key, sizeof(key), "layers.%u.output", L);
			out_hf = tu_read_f64(rf, key, &no);
			snprintf(key, sizeof(key), "layers.%u.topk_ids", L);
			fid = tu_read_f64(rf, key, &nid);
			snprintf(key, sizeof(key), "layers.%u.topk_weights", L);
			fw = tu_read_f64(rf, key, &nw);
			n = (uint32_t)(ni / H);
			in32 = malloc(ni * sizeof(float));
			in_m = malloc(ni * 4);
			out_m = malloc(ni * 4);
			y = malloc(ni * sizeof(double));
			ids = malloc(nid * sizeof(uint32_t));
			w = malloc(nid * sizeof(float));
			for (size_t i = 0; i < ni; i++)
				in32[i] = (float)in[i];
			moe_cpu_from_f32(m->dtype, in32, in_m, ni);
			fwd_ok(e, L, m->dtype, in_m, out_m, n, ids, w);
			for (uint32_t t = 0; t < n; t++) {
				uint32_t sorted[MOE_MAX_TOPK];
				bool same = true;

				memcpy(sorted, ids + (size_t)t * K, K * sizeof(uint32_t));
				qsort(sorted, K, sizeof(uint32_t), cmp_u32);
				for (uint32_t k = 0; k < K; k++)
					same &= sorted[k] == (uint32_t)fid[(size_t)t * K + k];
				if (!same) {
					differ++;
					continue;
				}
				for (uint32_t k = 0; k < K; k++)
					for (uint32_t j = 0; j < K; j++)
						if (ids[(size_t)t * K + j] == sorted[k] &&
						    fabs(w[(size_t)t * K + j] - fw[(size_t)t * K + k]) >
							    1e-5 * fabs(fw[(size_t)t * K + k]) + 1e-6)
							fail_msg("%s layer %u token %u: weight %g, "
								 "transformers %g",
								 fixtures[f], L, t,
								 w[(size_t)t * K + j],
								 fw[(size_t)t * K + k]);
			}
			/* a different set is a failure; printed with the count so
			 * that a near-tie flipped by summation order is visible */
			if (differ)
				fail_msg("%s layer %u: %zu of %u tokens chose other experts than "
					 "transformers", fixtures[f], L, differ, n);
			tu_to_f64(m->dtype, out_m, y, ni);
			snprintf(key, sizeof(key), "cuda %s layer %u %s vs transformers", fixtures[f],
				 L, moe_dtype_name(m->dtype));
			assert_true(tu_check_rows(key, y, out_hf, n, H, tol_atol(m->dtype),
						  tol_rtol(m->dtype)) <= 1);
			free(in), free(out_hf), free(fid), free(fw), free(y), free(in32);
			free(in_m), free(out_m), free(ids), free(w);
		}
		printf("ok   %s on the GPU (%s)\n", fixtures[f], mode);
		moe_st_close(rf);
		moe_engine_destroy(e);
		moe_model_free(m);
	}
}

static void test_fixtures(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(gemm_modes) / sizeof(gemm_modes[0]); i++)
		fixtures_in(gemm_modes[i]);
}

/* ---- GPU against CPU on random inputs ---------------------------------- */

static void test_against_cpu(void **state)
{
	(void)state;
	for (enum moe_family fam = 0; fam < MOE_FAM_COUNT; fam++) {
		struct moe_synth_opts o;
		struct moe_model *mc, *mg;
		struct moe_engine *ec, *eg;
		struct moe_rng r = {(uint64_t)fam + 40};
		char tmpl[] = "/tmp/moe-cuda-XXXXXX", err[MOE_ERRLEN], what[96];
		const uint32_t n = 300;

		assert_non_null(mkdtemp(tmpl));
		moe_synth_defaults(&o, fam);
		o.hidden = 256, o.inter = 96, o.experts = 16, o.top_k = 4, o.layers = 1;
		o.dtype = fam % 2 ? MOE_DT_F32 : MOE_DT_BF16, o.seed = 7 + fam;
		if (fam == MOE_FAM_QWEN2_MOE)
			o.shared_inter = 128;
		if (fam == MOE_FAM_DEEPSEEK_V2 || fam == MOE_FAM_DEEPSEEK_V3)
			o.shared_inter = 2 * o.inter; /* two shared experts */
		if (fam == MOE_FAM_DEEPSEEK_V3 || fam == MOE_FAM_DEEPSEEK_V2) {
			o.n_group = 4, o.topk_group = 2;
			o.group_limited = true;
		}
		if (moe_synth_write(tmpl, &o, err))
			fail_msg("%s", err);
		ec = open_on(tmpl, "cpu", 512, &mc);
		float *x = malloc((size_t)n * o.hidden * 4), *yc = malloc((size_t)n * o.hidden * 4),
		      *yg = malloc((size_t)n * o.hidden * 4);
		double *dc = malloc((size_t)n * o.hidden * 8), *dg = malloc((size_t)n * o.hidden * 8);
		for (size_t i = 0; i < (size_t)n * o.hidden; i++)
			x[i] = (float)moe_rng_normal(&r);
		fwd_ok(ec, mc->layers[0].index, MOE_DT_F32, x, yc, n, NULL, NULL);
		tu_to_f64(MOE_DT_F32, yc, dc, (size_t)n * o.hidden);
		for (size_t md = 0; md < sizeof(gemm_modes) / sizeof(gemm_modes[0]); md++) {
			eg = open_mode(tmpl, gemm_modes[md], 512, &mg);
			if (!eg)
				continue;
			fwd_ok(eg, mg->layers[0].index, MOE_DT_F32, x, yg, n, NULL, NULL);
			tu_to_f64(MOE_DT_F32, yg, dg, (size_t)n * o.hidden);
			snprintf(what, sizeof(what), "cuda (%s) vs cpu, %s %s", gemm_modes[md],
				 moe_family_name(fam), moe_dtype_name(o.dtype));
			/* grouped rounds the GEMM outputs to bf16 as well (cuBLAS has
			 * no bf16-in/fp32-out grouped GEMM), where transformers
			 * rounds: its tolerance against transformers, not 2e-2 */
			assert_true(tu_check_rows(what, dg, dc, n, o.hidden,
						  o.dtype == MOE_DT_F32	       ? 1e-4
						  : !strcmp(gemm_modes[md], "grouped") ? tol_atol(o.dtype)
										    : 2e-2,
						  1e-5) <= 1);
			printf("ok   %s\n", what);
			moe_engine_destroy(eg);
			moe_model_free(mg);
		}
		free(x), free(yc), free(yg), free(dc), free(dg);
		moe_engine_destroy(ec);
		moe_model_free(mc);
		tu_rmtree(tmpl);
	}
}

/* ---- small batches from CUDA graphs ----------------------------------- */

/* Decode-sized batches take the small path and replay a graph captured
 * per layer and token count (MOE_CUDA_GRAPHS, on by default). Each count
 * runs three times on fresh inputs split into other requests (one, two,
 * then up to three segments of mixed dtypes), so a replay that kept a
 * capture-time input, segment table or expert choice fails against the
 * CPU engine; the same batches without graphs must agree too. */
static void graphs_on(enum moe_family fam, const char *gemm, const char *graphs,
		      const char *fused)
{
	static const uint32_t counts[] = {1, 2, 5, 16, 33, 64};
	static const enum moe_dtype dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F32};
	struct moe_synth_opts o;
	struct moe_model *mc, *mg;
	struct moe_engine *ec, *eg;
	struct moe_rng r = {(uint64_t)fam + 90};
	char tmpl[] = "/tmp/moe-cuda-graph-XXXXXX", err[MOE_ERRLEN], what[128];

	assert_non_null(mkdtemp(tmpl));
	moe_synth_defaults(&o, fam);
	o.hidden = 256, o.inter = 96, o.experts = 16, o.top_k = 4, o.layers = 2;
	o.dtype = MOE_DT_BF16, o.seed = 11 + fam;
	if (fam == MOE_FAM_QWEN2_MOE)
		o.shared_inter = 128;
	if (fam == MOE_FAM_DEEPSEEK_V3 || fam == MOE_FAM_DEEPSEEK_V2) {
		o.shared_inter = 2 * o.inter;
		o.n_group = 4, o.topk_group = 2, o.group_limited = true;
	}
	if (moe_synth_write(tmpl, &o, err))
		fail_msg("%s", err);
	ec = open_on(tmpl, "cpu", 64, &mc);
	setenv("MOE_CUDA_GRAPHS", graphs, 1);
	setenv("MOE_CUDA_GEMM", gemm, 1);
	setenv("MOE_CUDA_FUSED", fused, 1);
	eg = open_on(tmpl, "cuda", 64, &mg);
	unsetenv("MOE_CUDA_GRAPHS");
	unsetenv("MOE_CUDA_GEMM");
	unsetenv("MOE_CUDA_FUSED");
	for (size_t ci = 0; ci < sizeof(counts) / sizeof(counts[0]); ci++) {
		const uint32_t n = counts[ci], H = o.hidden;

		for (int rep = 0; rep < 3; rep++) {
			uint32_t L = mg->layers[rep % mg->n_moe_layers].index, nseg = 0, t0 = 0;
			struct moe_seg segs[3];
			void *in[3], *out[3];
			float *x = malloc((size_t)n * H * 4), *yc = malloc((size_t)n * H * 4);
			double *dc = malloc((size_t)n * H * 8), *dg = malloc((size_t)n * H * 8);
			float kms, dms;

			for (size_t i = 0; i < (size_t)n * H; i++)
				x[i] = (float)moe_rng_normal(&r);
			/* the reference: each token's input as the GPU will get it */
			while (t0 < n) {
				uint32_t len = rep == 0 ? n : rep == 1 ? (n + 1) / 2 : (n + 2) / 3;
				enum moe_dtype dt = dts[nseg];
				size_t cnt;

				len = len < n - t0 ? len : n - t0;
				cnt = (size_t)len * H;
				in[nseg] = malloc(cnt * 4), out[nseg] = malloc(cnt * 4);
				moe_cpu_from_f32(dt, x + (size_t)t0 * H, in[nseg], cnt);
				moe_cpu_to_f32(dt, in[nseg], x + (size_t)t0 * H, cnt);
				segs[nseg] = (struct moe_seg){in[nseg], out[nseg], dt, len, NULL, NULL};
				t0 += len, nseg++;
			}
			fwd_ok(ec, L, MOE_DT_F32, x, yc, n, NULL, NULL);
			{
				struct moe_epoch *ep = moe_epoch_acquire(eg);
				struct moe_batch b = {.layer = L, .n_tokens = n, .n_segs = nseg,
						      .segs = segs};

				if (moe_engine_forward(eg, ep, &b, err))
					fail_msg("%s", err);
				moe_epoch_release(ep);
			}
			kms = moe_engine_last_kernel_ms(eg), dms = moe_engine_last_device_ms(eg);
			assert_true(kms > 0 && kms <= dms);
			t0 = 0;
			for (uint32_t sI = 0; sI < nseg; sI++) {
				tu_to_f64(segs[sI].dtype, out[sI], dg + (size_t)t0 * H,
					  (size_t)segs[sI].n_tokens * H);
				t0 += segs[sI].n_tokens;
				free(in[sI]), free(out[sI]);
			}
			tu_to_f64(MOE_DT_F32, yc, dc, (size_t)n * H);
			snprintf(what, sizeof(what), "cuda (%s, graphs %s, fused %s) vs cpu, %s, "
				 "%u tokens in %u requests", gemm, graphs, fused,
				 moe_family_name(fam), n, nseg);
			/* bf16 outputs (segment 2) add one rounding: 1/128 relative */
			assert_true(tu_check_rows(what, dg, dc, n, H, 2e-2, 1.0 / 128) <= 1);
			free(x), free(yc), free(dc), free(dg);
		}
	}
	printf("ok   %s (%s, graphs %s, fused front %s): 1-64 tokens, 3 splits each\n",
	       moe_family_name(fam), gemm, graphs, fused);
	moe_engine_destroy(eg);
	moe_model_free(mg);
	moe_engine_destroy(ec);
	moe_model_free(mc);
	tu_rmtree(tmpl);
}

static void test_graphs(void **state)
{
	(void)state;
	graphs_on(MOE_FAM_OLMOE, "auto", "1", "1");
	graphs_on(MOE_FAM_QWEN2_MOE, "small", "1", "1");
	graphs_on(MOE_FAM_DEEPSEEK_V3, "small", "1", "1");
	graphs_on(MOE_FAM_DEEPSEEK_V2, "small", "1", "0");
	graphs_on(MOE_FAM_MIXTRAL, "small", "0", "1");
	graphs_on(MOE_FAM_QWEN3_MOE, "small", "0", "0");
}

/* ---- segments in several dtypes --------------------------------------- */

/* dir's first MoE layer: three segments in one batch against each alone.
 * lens[0] is odd: with an odd hidden size the f32 segment after it would
 * start off a 4-byte boundary unless segments are padded. */
static void segments_on(const char *dir)
{
	static const enum moe_dtype dts[] = {MOE_DT_BF16, MOE_DT_F32, MOE_DT_F16};
	static const uint32_t lens[] = {7, 200, 1};
	char err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e;
	struct moe_rng r = {77};
	struct moe_seg segs[3];
	void *in[3], *out[3], *ref[3];
	uint32_t n = 0;

	e = open_on(dir, "cuda", 512, &m);
	for (int i = 0; i < 3; i++) {
		size_t cnt = (size_t)lens[i] * m->hidden, sz = moe_dtype_size(dts[i]);
		float *v = malloc(cnt * 4);

		for (size_t j = 0; j < cnt; j++)
			v[j] = (float)moe_rng_normal(&r);
		in[i] = malloc(cnt * sz), out[i] = malloc(cnt * sz), ref[i] = malloc(cnt * sz);
		moe_cpu_from_f32(dts[i], v, in[i], cnt);
		free(v);
		segs[i] = (struct moe_seg){in[i], out[i], dts[i], lens[i], NULL, NULL};
		n += lens[i];
		fwd_ok(e, m->layers[0].index, dts[i], in[i], ref[i], lens[i], NULL, NULL);
	}
	{
		struct moe_epoch *ep = moe_epoch_acquire(e);
		struct moe_batch b = {.layer = m->layers[0].index, .n_tokens = n, .n_segs = 3,
				      .segs = segs};

		if (moe_engine_forward(e, ep, &b, err))
			fail_msg("%s", err);
		moe_epoch_release(ep);
	}
	for (int i = 0; i < 3; i++) {
		size_t cnt = (size_t)lens[i] * m->hidden;
		double *a = malloc(cnt * 8), *b = malloc(cnt * 8);

		tu_to_f64(dts[i], out[i], a, cnt);
		tu_to_f64(dts[i], ref[i], b, cnt);
		assert_true(tu_check_rows("segment vs alone", a, b, lens[i], m->hidden, 2e-2,
					  1.0 / 128) <= 1);
		free(a), free(b), free(in[i]), free(out[i]), free(ref[i]);
	}
	assert_true(moe_engine_last_device_ms(e) > 0);
	printf("ok   segments on %s (hidden %u)\n", dir, m->hidden);
	moe_engine_destroy(e);
	moe_model_free(m);
}

static void test_segments(void **state)
{
	struct moe_synth_opts o;
	char tmpl[] = "/tmp/moe-cuda-odd-XXXXXX", err[MOE_ERRLEN];

	(void)state;
	segments_on(DH_FIXTURE);
	assert_non_null(mkdtemp(tmpl));
	moe_synth_defaults(&o, MOE_FAM_MIXTRAL);
	o.hidden = 75, o.inter = 33, o.experts = 8, o.top_k = 2, o.layers = 1;
	o.dtype = MOE_DT_BF16, o.seed = 3;
	if (moe_synth_write(tmpl, &o, err))
		fail_msg("%s", err);
	segments_on(tmpl);
	tu_rmtree(tmpl);
}

/* ---- out of device memory at load --------------------------------------- */

/* Workspaces for 2^31 tokens cannot fit any GPU: the load fails with a
 * message that names what did not fit and the GPU's free memory. */
static void test_oom_message(void **state)
{
	struct moe_engine_opts o = {.threads = 1, .max_batch_tokens = 1u << 31, .backend = "cuda"};
	char err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e = NULL;

	(void)state;
	if (moe_model_open(DH_FIXTURE, NULL, &m, err))
		fail_msg("%s", err);
	assert_int_equal(moe_engine_create(m, &o, &e, err), -ENOMEM);
	printf("out of memory: %s\n", err);
	assert_non_null(strstr(err, "GPU 0: out of device memory for the batch input buffer"));
	assert_non_null(strstr(err, "free of"));
	assert_null(e);
	moe_model_free(m);
}

/* ---- moed on the GPU ---------------------------------------------------- */

static void test_daemon_gpu(void **state)
{
	struct daemon *d = dh_daemon_new(DH_FIXTURE, false, DH_WAIT_MS);
	moe_client *c;
	char *js = NULL;
	cJSON *j;

	(void)state;
	d->socket_arg = true; /* --socket: the test's own, not /run/moed */
	dh_daemon_write_cfg(d, "devices: [0]\n");
	dh_daemon_start(d);
	assert_int_equal(moe_connect(d->sock, &c), 0);
	dh_cl_track(c);
	for (uint32_t i = 0; i < 6; i++) {
		uint32_t layer = g_model->layers[i % g_model->n_moe_layers].index, n = 1 + i * 9;
		float *x = dh_make_input(MOE_DTYPE_F32, n, 900 + i), *y = malloc((size_t)n * g_H * 4),
		      *ref = malloc((size_t)n * g_H * 4);
		double *a = malloc((size_t)n * g_H * 8), *b = malloc((size_t)n * g_H * 8);

		assert_int_equal(moe_forward(c, layer, MOE_DTYPE_F32, x, y, n), 0);
		dh_ref_forward(layer, MOE_DTYPE_F32, x, ref, n);
		tu_to_f64(MOE_DT_F32, y, a, (size_t)n * g_H);
		tu_to_f64(MOE_DT_F32, ref, b, (size_t)n * g_H);
		assert_true(tu_check_rows("moed on the GPU vs the CPU engine", a, b, n, g_H, 2e-2,
					  1e-5) <= 1);
		free(x), free(y), free(ref), free(a), free(b);
	}
	assert_int_equal(moe_status_json(c, &js, NULL), 0);
	j = cJSON_Parse(js);
	assert_non_null(j);
	assert_string_equal(dh_jget(dh_jget(j, "backend", cJSON_Object), "name", cJSON_String)
				    ->valuestring,
			    "cuda");
	assert_non_null(strstr(dh_jget(dh_jget(j, "backend", cJSON_Object), "gpu", cJSON_String)
				       ->valuestring,
			       "GPU 0"));
	printf("status backend: %s\n",
	       dh_jget(dh_jget(j, "backend", cJSON_Object), "gpu", cJSON_String)->valuestring);
	cJSON_Delete(j);
	free(js);
	dh_cl_close(c);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- faults (own process: `test_cuda fault`) ----------------------------- */

static void test_engine_fault(void **state)
{
	char dir[1024], err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e;
	float *x, *y;

	(void)state;
	setenv("MOED_TEST_CUDA_FAULT", "2", 1);
	snprintf(dir, sizeof(dir), "%s", DH_FIXTURE);
	e = open_on(dir, "cuda", 16, &m);
	unsetenv("MOED_TEST_CUDA_FAULT");
	x = dh_make_input(MOE_DTYPE_F32, 4, 5); /* g_H: the same fixture */
	y = malloc((size_t)4 * m->hidden * 4);
	assert_int_equal(fwd(e, m->layers[0].index, MOE_DT_F32, x, y, 1, NULL, NULL, err), 0);
	assert_int_equal(fwd(e, m->layers[0].index, MOE_DT_F32, x, y, 1, NULL, NULL, err),
			 -ENOTRECOVERABLE);
	printf("injected fault: %s\n", err);
	assert_non_null(strstr(err, "GPU 0"));
	assert_true(moe_engine_lost(e));
	assert_int_equal(fwd(e, m->layers[0].index, MOE_DT_F32, x, y, 1, NULL, NULL, err),
			 -ENOTRECOVERABLE);
	free(x), free(y);
	moe_engine_destroy(e);
	moe_model_free(m);
}

static void test_daemon_fault(void **state)
{
	struct daemon *d = dh_daemon_new(DH_FIXTURE, false, DH_WAIT_MS);
	struct req q[6];
	moe_client *c;
	int st;

	(void)state;
	d->socket_arg = true; /* --socket: the test's own, not /run/moed */
	dh_daemon_write_cfg(d, "devices: [0]\n");
	dh_daemon_env(d, "MOED_TEST_CUDA_FAULT=2");
	dh_daemon_start(d);
	assert_int_equal(moe_connect(d->sock, &c), 0);
	dh_cl_track(c);
	{
		float *x = dh_make_input(MOE_DTYPE_F32, 2, 1), *y = malloc((size_t)2 * g_H * 4);

		assert_int_equal(moe_forward(c, g_model->layers[0].index, MOE_DTYPE_F32, x, y, 2), 0);
		free(x), free(y);
	}
	dh_daemon_freeze(d);
	for (int i = 0; i < 6; i++)
		dh_req_submit(c, &q[i], g_model->layers[i % g_model->n_moe_layers].index,
			      MOE_DTYPE_F32, 3, 50 + (uint64_t)i, 0);
	dh_daemon_thaw(d);
	for (int i = 0; i < 6; i++) {
		int r = moe_wait(c, q[i].tag, DH_WAIT_MS, &st);

		if (r)
			fail_msg("request %d: moe_wait: %s (a hang would end here)", i,
				 moe_strerror(r));
		if (st != MOE_EDEVICE && st != MOE_EDAEMON)
			fail_msg("request %d: %s, not MOE_EDEVICE", i, moe_strerror(st));
		dh_req_free(c, &q[i]);
	}
	st = dh_daemon_wait_exit(d, DH_EXIT_MS);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 3)
		fail_msg("moed's wait status after an illegal access: 0x%x (want exit 3)", st);
	g_passed = true;
}

int main(int argc, char **argv)
{
	bool fault = argc > 1 && !strcmp(argv[1], "fault");
#ifdef MOE_HAVE_CUDA
	char why[256] = "";
	int n = moe_cuda_device_count(why, sizeof(why));

	if (n <= 0) {
		printf("SKIPPED: no usable GPU (%s): the CUDA tests need one\n",
		       n == 0 ? "no CUDA device" : why);
		return 77;
	}
#else
	printf("SKIPPED: built without CUDA (MOE_CUDA=OFF)\n");
	return 77;
#endif
	const struct CMUnitTest main_tests[] = {
		cmocka_unit_test(test_fixtures),
		cmocka_unit_test(test_against_cpu),
		cmocka_unit_test(test_graphs),
		cmocka_unit_test(test_segments),
		cmocka_unit_test(test_oom_message),
		cmocka_unit_test_setup_teardown(test_daemon_gpu, dh_setup, dh_teardown),
	};
	const struct CMUnitTest fault_tests[] = {
		cmocka_unit_test_setup_teardown(test_daemon_fault, dh_setup, dh_teardown),
		cmocka_unit_test(test_engine_fault), /* last: poisons this process' context */
	};

	if (fault)
		return cmocka_run_group_tests_name("cuda faults", fault_tests, dh_group_setup,
						   dh_group_teardown);
	return cmocka_run_group_tests_name("cuda", main_tests, dh_group_setup, dh_group_teardown);
}
