/* tests/test_engine.c — the engine against Hugging Face transformers and
 * against an independent float64 reference.
 *
 * Fixtures (tests/fixtures/<case>/, made by gen_hf_fixtures.py with
 * transformers' own MoE blocks) give, per MoE layer, inputs, transformers'
 * output, a float64 reference of the same block, and the chosen experts.
 * Tolerances, in the form |y - ref| <= atol * rms(ref row) + rtol * |ref|:
 *
 *  - fp32 output vs the float64 reference: atol 2e-5, rtol 1e-5. The engine
 *    accumulates in fp32; the fixture README measured 1.7e-6 for an fp32
 *    computation of the same math.
 *  - model-dtype output vs transformers' output: bf16 atol 5e-2, f16 8e-3,
 *    f32 2e-5 (rtol: one ulp of the dtype). transformers rounds every
 *    intermediate to bf16 (and Qwen/OLMoE also round the routing weights),
 *    which puts its own output up to 2.5e-2 x rms away from the float64
 *    reference (measured, fixtures/README.md); ours is within half an ulp
 *    of the float64 reference, so the distance between the two is bounded by
 *    the sum.
 *  - the chosen top-k experts must be identical; routing weights within
 *    1e-5 relative.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/engine/backend.h"
#include "daemon/engine/engine.h"
#include "kernels/cpu/convert.h"
#include "kernels/cpu/isa.h"
#include "daemon/engine/model.h"
#include "daemon/engine/threadpool.h"
#include "tests/testutil.h"
#include "tools/synth.h"

static const char *const cases[] = {
	"mixtral_bf16",	    "mixtral_f32_fused", "qwen2_moe_bf16",	  "qwen3_moe_f16_sharded",
	"olmoe_f32",	    "olmoe_bf16_norm",	 "deepseek_v2_bf16",	  "deepseek_v3_bf16",
	"deepseek_v3_f32_fused", "deepseek_v2_group_limited_f32",
	/* bf16 checkpoints made by from_pretrained(dtype=bf16) + save_pretrained
	 * with transformers 5.25: DeepSeek's router written F32 */
	"deepseek_v2_bf16_f32router", "deepseek_v3_bf16_f32router",
};

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static double tol_atol(enum moe_dtype dt)
{
	return dt == MOE_DT_BF16 ? 5e-2 : dt == MOE_DT_F16 ? 8e-3 : 2e-5;
}

static double tol_rtol(enum moe_dtype dt)
{
	return dt == MOE_DT_BF16 ? 1.0 / 256 : dt == MOE_DT_F16 ? 1.0 / 1024 : 1e-5;
}

/* The CPU path under test: every supported one in turn (main()). */
static const char *isa_under_test;
/* test_device_fault: the batch that fails as a lost device would */
static unsigned long fault_at;

static struct moe_engine *open_engine_p(const char *dir, uint32_t threads, uint32_t max_tokens,
					const char *precision, struct moe_model **mp)
{
	struct moe_engine_opts o = {.threads = threads, .max_batch_tokens = max_tokens,
				    .tuning.isa = isa_under_test, .tuning.precision = precision,
				    .test_fault_at = fault_at};
	struct moe_engine *e;
	char err[MOE_ERRLEN];

	if (moe_model_open(dir, NULL, mp, err))
		fail_msg("%s", err);
	if (moe_engine_create(*mp, &o, &e, err))
		fail_msg("%s", err);
	return e;
}

/* cpu.precision auto: bf16 for bf16 models */
static struct moe_engine *open_engine(const char *dir, uint32_t threads, uint32_t max_tokens,
				      struct moe_model **mp)
{
	return open_engine_p(dir, threads, max_tokens, NULL, mp);
}

static float *read_mat(struct moe_model *m, const struct moe_mat_src *s);

/* h of a bf16-precision expert, rounded as the engine rounds it, and
 * whether the engine's fp32 h (within delta of the exact one) could round
 * to the other neighbour. */
static double round_h_bf16(double h, double delta, bool *near)
{
	float f = (float)h;
	uint32_t b;
	double lo, hi;

	memcpy(&b, &f, 4);
	b &= 0xffff0000u; /* the neighbour toward zero, and the next one out */
	memcpy(&f, &b, 4);
	lo = f;
	b += 0x10000u;
	memcpy(&f, &b, 4);
	hi = f;
	*near = fabs(fabs(h) - (fabs(lo) + fabs(hi)) / 2) <= delta;
	return moe_bf16_to_f32(moe_f32_to_bf16((float)h));
}

/* One expert in float64 with h rounded to bf16 (cpu.precision bf16):
 * y += w * down(bf16(h)); slack[j] += |w d_ji| 2^-7 |h_i| (a bf16 ulp) for
 * the h_i that could round the other way. */
static void ffn_bf16h(struct moe_model *m, const struct moe_expert_src *xs, uint32_t I, double w,
		      const double *x, double *y, double *slack)
{
	uint32_t H = m->hidden;
	float *g = read_mat(m, &xs->gate), *u = read_mat(m, &xs->up), *d = read_mat(m, &xs->down);
	double *h = malloc(I * sizeof(double)), *ulp = malloc(I * sizeof(double));

	for (uint32_t i = 0; i < I; i++) {
		double a = 0, b = 0, ma = 0, mb = 0, e = (H + 2) * ldexp(1, -24), sa, delta;
		bool near;

		for (uint32_t j = 0; j < H; j++) {
			a += (double)g[(size_t)i * H + j] * x[j];
			b += (double)u[(size_t)i * H + j] * x[j];
			ma += fabs((double)g[(size_t)i * H + j] * x[j]);
			mb += fabs((double)u[(size_t)i * H + j] * x[j]);
		}
		/* the fp32 sums' error (check_panels' bound) through silu(a) * b,
		 * plus a few ulps for exp and the products */
		sa = a / (1 + exp(-a));
		delta = 1.1 * e * ma * fabs(b) + fabs(sa) * e * mb + 1e-6 * fabs(sa * b) + 1e-37;
		h[i] = round_h_bf16(sa * b, delta, &near);
		ulp[i] = near ? fabs(h[i]) * ldexp(1, -7) + 1e-38 : 0;
	}
	for (uint32_t j = 0; j < H; j++) {
		double s = 0, e = 0;

		for (uint32_t i = 0; i < I; i++) {
			s += (double)d[(size_t)j * I + i] * h[i];
			e += fabs((double)d[(size_t)j * I + i]) * ulp[i];
		}
		y[j] += w * s;
		slack[j] += fabs(w) * e;
	}
	free(g), free(u), free(d), free(h), free(ulp);
}

/* A bf16-precision engine's fp32 output against float64 with h rounded
 * to bf16, on transformers' routing (ids and weights, checked equal to the
 * engine's in run_case). Tolerance per element: 2e-5 x the row's rms +
 * 1e-5 x |ref| (as fp32 vs ref64) + the h roundings that could go the
 * other way (slack). */
static void check_bf16_precision(const char *what, struct moe_model *m, uint32_t l,
				 const double *in, const double *fid, const double *fw,
				 const double *y, uint32_t n)
{
	const struct moe_layer_desc *d = &m->layers[l];
	uint32_t H = m->hidden, K = m->top_k;
	double *ref = calloc(H, 8), *slack = calloc(H, 8), worst = 0;
	float *sg = d->has_shared_gate ? read_mat(m, &d->shared_gate) : NULL;
	uint32_t flagged = 0;

	for (uint32_t t = 0; t < n; t++) {
		const double *x = in + (size_t)t * H;
		double rms = 0, gate = 1;

		memset(ref, 0, H * 8);
		memset(slack, 0, H * 8);
		for (uint32_t k = 0; k < K; k++)
			ffn_bf16h(m, &d->experts[(uint32_t)fid[(size_t)t * K + k]], m->inter,
				  fw[(size_t)t * K + k], x, ref, slack);
		if (d->has_shared) {
			if (sg) {
				double z = 0;

				for (uint32_t j = 0; j < H; j++)
					z += (double)sg[j] * x[j];
				gate = 1 / (1 + exp(-z));
			}
			ffn_bf16h(m, &d->shared, m->shared_inter, gate, x, ref, slack);
		}
		for (uint32_t j = 0; j < H; j++)
			rms += ref[j] * ref[j];
		rms = sqrt(rms / H);
		for (uint32_t j = 0; j < H; j++) {
			double err = fabs(y[(size_t)t * H + j] - ref[j]);
			double tol = 2e-5 * rms + 1e-5 * fabs(ref[j]) + slack[j];

			flagged += slack[j] > 0;
			if (!(err <= tol))
				fail_msg("%s: [%u,%u] = %.9g, want %.9g (tolerance %.3g, of which "
					 "%.3g for h roundings)", what, t, j, y[(size_t)t * H + j],
					 ref[j], tol, slack[j]);
			worst = fmax(worst, err / tol);
		}
	}
	print_message("%s: worst %.2f of the tolerance, %u of %u outputs with a h rounding "
		      "allowance\n", what, worst, flagged, n * H);
	free(ref), free(slack), free(sg);
}

static void forward(struct moe_engine *e, uint32_t layer, enum moe_dtype dt, const void *in,
		    void *out, uint32_t n, uint32_t *ids, float *w)
{
	struct moe_epoch *ep = moe_epoch_acquire(e);
	struct moe_batch b = {layer, n, dt, in, out, ids, w, 0, NULL, NULL};
	char err[MOE_ERRLEN];

	if (moe_engine_forward(e, ep, &b, err))
		fail_msg("forward: %s", err);
	moe_epoch_release(ep);
}

static void run_case(const char *name)
{
	char dir[1024], ref[1100], err[MOE_ERRLEN], key[128];
	struct moe_st_file *rf;
	struct moe_model *m, *mb = NULL, *mr = NULL;
	struct moe_engine *e, *eb = NULL;
	bool bf16 = false;

	snprintf(dir, sizeof(dir), "%s/%s", MOE_FIXTURES_DIR, name);
	snprintf(ref, sizeof(ref), "%s/reference.safetensors", dir);
	/* e: fp32 activations, against the float64 reference; eb (bf16
	 * models): bf16 precision, what serves them by default */
	e = open_engine_p(dir, 2, 64, "fp32", &m);
	bf16 = m->dtype == MOE_DT_BF16;
	if (bf16) {
		eb = open_engine(dir, 2, 64, &mb);
		if (moe_model_open(dir, NULL, &mr, err)) /* to read weights from */
			fail_msg("%s", err);
	}
	if (moe_st_open(ref, &rf, err))
		fail_msg("%s", err);
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		uint32_t L = m->layers[l].index, H = m->hidden, K = m->top_k;
		size_t ni, no, nr, nid, nw;
		double *in, *out_hf, *out64, *fid, *fw, *y;
		uint32_t n, *ids;
		float *w, *in32, *out32;
		void *in_m, *out_m;
		size_t esz = moe_dtype_size(m->dtype);

		snprintf(key, sizeof(key), "layers.%u.input", L);
		in = tu_read_f64(rf, key, &ni);
		snprintf(key, sizeof(key), "layers.%u.output", L);
		out_hf = tu_read_f64(rf, key, &no);
		snprintf(key, sizeof(key), "layers.%u.output_ref64", L);
		out64 = tu_read_f64(rf, key, &nr);
		snprintf(key, sizeof(key), "layers.%u.topk_ids", L);
		fid = tu_read_f64(rf, key, &nid);
		snprintf(key, sizeof(key), "layers.%u.topk_weights", L);
		fw = tu_read_f64(rf, key, &nw);
		n = (uint32_t)(ni / H);
		assert_int_equal(ni, (size_t)n * H);
		assert_int_equal(nid, (size_t)n * K);

		in32 = malloc(ni * sizeof(float));
		out32 = malloc(ni * sizeof(float));
		in_m = malloc(ni * esz);
		out_m = malloc(ni * esz);
		y = malloc(ni * sizeof(double));
		ids = malloc(nid * sizeof(uint32_t));
		w = malloc(nid * sizeof(float));
		for (size_t i = 0; i < ni; i++)
			in32[i] = (float)in[i];
		/* the input in the model dtype, as transformers saw it */
		for (size_t i = 0; i < ni; i++) {
			if (m->dtype == MOE_DT_F32)
				((float *)in_m)[i] = in32[i];
			else if (m->dtype == MOE_DT_BF16)
				((uint16_t *)in_m)[i] = moe_f32_to_bf16(in32[i]);
			else
				((uint16_t *)in_m)[i] = moe_f32_to_f16(in32[i]);
		}

		/* 1. fp32 request: tight against the float64 reference */
		forward(e, L, MOE_DT_F32, in32, out32, n, ids, w);
		tu_to_f64(MOE_DT_F32, out32, y, ni);
		snprintf(key, sizeof(key), "%s layer %u fp32 vs ref64", name, L);
		assert_true(tu_check_rows(key, y, out64, n, H, 2e-5, 1e-5) <= 1);

		/* 2. same experts, same weights */
		for (uint32_t t = 0; t < n; t++) {
			uint32_t sorted[MOE_MAX_TOPK];

			memcpy(sorted, ids + (size_t)t * K, K * sizeof(uint32_t));
			qsort(sorted, K, sizeof(uint32_t), cmp_u32);
			for (uint32_t k = 0; k < K; k++) {
				if (sorted[k] != (uint32_t)fid[(size_t)t * K + k])
					fail_msg("%s layer %u token %u: expert %u chosen, "
						 "transformers chose %u",
						 name, L, t, sorted[k],
						 (uint32_t)fid[(size_t)t * K + k]);
				for (uint32_t j = 0; j < K; j++)
					if (ids[(size_t)t * K + j] == sorted[k])
						assert_true(fabs(w[(size_t)t * K + j] -
								 fw[(size_t)t * K + k]) <=
							    1e-5 * fabs(fw[(size_t)t * K + k]) +
								    1e-7);
			}
		}

		/* 3. bf16 precision (bf16 models): the same routing, against
		 *    float64 with h rounded to bf16 */
		if (bf16) {
			uint32_t *ids_b = malloc(nid * sizeof(uint32_t));

			forward(eb, L, MOE_DT_F32, in32, out32, n, ids_b, NULL);
			assert_memory_equal(ids_b, ids, nid * sizeof(uint32_t));
			tu_to_f64(MOE_DT_F32, out32, y, ni);
			snprintf(key, sizeof(key), "%s layer %u fp32 (bf16 precision, %s kernels) vs "
				 "ref64 with bf16 h", name, L, moe_engine_kernels(eb));
			check_bf16_precision(key, mr, l, in, fid, fw, y, n);
			free(ids_b);
		}

		/* 4. model-dtype request (the default precision): against
		 *    transformers' own output, and bit-for-bit the fp32 result
		 *    rounded once */
		forward(bf16 ? eb : e, L, m->dtype, in_m, out_m, n, NULL, NULL);
		tu_to_f64(m->dtype, out_m, y, ni);
		snprintf(key, sizeof(key), "%s layer %u %s vs transformers", name, L,
			 moe_dtype_name(m->dtype));
		assert_true(tu_check_rows(key, y, out_hf, n, H, tol_atol(m->dtype),
					  tol_rtol(m->dtype)) <= 1);
		for (size_t i = 0; i < ni; i++)
			assert_true(y[i] == (double)moe_round_to(m->dtype, out32[i]));

		free(in), free(out_hf), free(out64), free(fid), free(fw), free(y);
		free(in32), free(out32), free(in_m), free(out_m), free(ids), free(w);
	}
	moe_st_close(rf);
	moe_engine_destroy(e);
	moe_model_free(m);
	if (eb) {
		moe_engine_destroy(eb);
		moe_model_free(mb);
		moe_model_free(mr);
	}
}

static void test_fixture(void **state)
{
	run_case(*state);
}

/* ---- an independent float64 reference on synthetic models ------------- */

struct refw {
	float *router, *bias, *sgate;
	float *g, *u, *d;    /* [E][I*H], [E][I*H], [E][H*I] */
	float *sg, *su, *sd; /* shared */
};

static float *read_mat(struct moe_model *m, const struct moe_mat_src *s)
{
	float *p = malloc((size_t)s->rows * s->cols * sizeof(float));
	char err[MOE_ERRLEN];

	assert_non_null(p);
	if (moe_model_read_f32(m, s, p, err))
		fail_msg("%s", err);
	return p;
}

static double ffn(const float *g, const float *u, const float *d, uint32_t I, uint32_t H,
		  const double *x, double *y)
{
	double *h = malloc(I * sizeof(double));

	for (uint32_t i = 0; i < I; i++) {
		double a = 0, b = 0;

		for (uint32_t j = 0; j < H; j++) {
			a += (double)g[(size_t)i * H + j] * x[j];
			b += (double)u[(size_t)i * H + j] * x[j];
		}
		h[i] = a / (1 + exp(-a)) * b;
	}
	for (uint32_t j = 0; j < H; j++) {
		double s = 0;

		for (uint32_t i = 0; i < I; i++)
			s += (double)d[(size_t)j * I + i] * h[i];
		y[j] = s;
	}
	free(h);
	return 0;
}

/* Routing in double, written from MODELS.md independently of route.c.
 * Returns false when the token has a near-tie at the selection boundary. */
static bool ref_route(const struct moe_model *m, const double *logit, const float *bias,
		      uint32_t *ids, double *w)
{
	uint32_t E = m->n_experts, K = m->top_k;
	double s[MOE_MAX_EXPERTS], sel[MOE_MAX_EXPERTS], mx = -INFINITY, sum = 0;
	bool ok = true;

	for (uint32_t e = 0; e < E; e++)
		mx = fmax(mx, logit[e]);
	for (uint32_t e = 0; e < E; e++) {
		if (m->route.score == MOE_SCORE_SIGMOID)
			s[e] = 1 / (1 + exp(-logit[e]));
		else
			sum += (s[e] = exp(logit[e] - mx));
	}
	for (uint32_t e = 0; e < E; e++) {
		if (m->route.score == MOE_SCORE_SOFTMAX)
			s[e] /= sum;
		sel[e] = s[e] + (bias ? bias[e] : 0);
	}
	if (m->route.group != MOE_GROUP_NONE) {
		uint32_t G = m->route.n_group, per = E / G;
		double gs[MOE_MAX_EXPERTS];
		bool keep[MOE_MAX_EXPERTS] = {0};

		for (uint32_t g = 0; g < G; g++) {
			double v[MOE_MAX_EXPERTS];

			memcpy(v, sel + g * per, per * sizeof(double));
			/* top-2 by sorting a copy */
			for (uint32_t i = 0; i < per; i++)
				for (uint32_t j = i + 1; j < per; j++)
					if (v[j] > v[i]) {
						double t = v[i];
						v[i] = v[j], v[j] = t;
					}
			gs[g] = m->route.group == MOE_GROUP_MAX ? v[0] : v[0] + v[1];
		}
		for (uint32_t k = 0; k < m->route.topk_group; k++) {
			int b = -1;

			for (uint32_t g = 0; g < G; g++)
				if (!keep[g] && (b < 0 || gs[g] > gs[b]))
					b = (int)g;
			keep[b] = true;
		}
		for (uint32_t g = 0; g < G; g++)
			if (!keep[g])
				for (uint32_t i = 0; i < per; i++)
					sel[g * per + i] = -INFINITY;
	}
	bool taken[MOE_MAX_EXPERTS] = {0};
	double wsum = 0, kth = 0;

	for (uint32_t k = 0; k <= K && k < E; k++) {
		int b = -1;

		for (uint32_t e = 0; e < E; e++)
			if (!taken[e] && (b < 0 || sel[e] > sel[b]))
				b = (int)e;
		if (k == K) {
			if (kth - sel[b] < 1e-6)
				ok = false;
			break;
		}
		taken[b] = true;
		ids[k] = (uint32_t)b;
		w[k] = s[b];
		wsum += w[k];
		kth = sel[b];
	}
	for (uint32_t k = 0; k < K; k++) {
		if (m->route.renormalize)
			w[k] /= wsum + (m->family == MOE_FAM_DEEPSEEK_V3 ? 1e-20 : 0);
		w[k] *= m->route.scale;
	}
	return ok;
}

/* Compares the engine with the float64 reference on random inputs. */
static void check_synthetic(const char *dir, uint32_t n, uint32_t max_tokens)
{
	struct moe_model *m, *mr;
	struct moe_engine *e = open_engine(dir, 2, max_tokens, &m);
	struct moe_rng r = {7};
	char err[MOE_ERRLEN];
	uint32_t skipped = 0;

	if (moe_model_open(dir, NULL, &mr, err))
		fail_msg("%s", err);
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		const struct moe_layer_desc *d = &mr->layers[l];
		uint32_t H = m->hidden, I = m->inter, E = m->n_experts, K = m->top_k;
		struct refw rw = {0};
		float *x = malloc((size_t)n * H * sizeof(float)), *out = malloc((size_t)n * H * 4);
		double *xd = malloc((size_t)n * H * 8), *y = malloc((size_t)n * H * 8);
		double *ref = calloc((size_t)n * H, 8), *tmp = malloc(H * 8);
		uint32_t *ids = malloc((size_t)n * K * 4);
		char what[128];

		rw.router = read_mat(mr, &d->router);
		if (d->has_bias)
			rw.bias = read_mat(mr, &d->bias);
		if (d->has_shared_gate)
			rw.sgate = read_mat(mr, &d->shared_gate);
		for (size_t i = 0; i < (size_t)n * H; i++) {
			x[i] = (float)moe_rng_normal(&r);
			xd[i] = x[i];
		}
		forward(e, d->index, MOE_DT_F32, x, out, n, ids, NULL);
		tu_to_f64(MOE_DT_F32, out, y, (size_t)n * H);
		for (uint32_t t = 0; t < n; t++) {
			double logit[MOE_MAX_EXPERTS], w[MOE_MAX_TOPK];
			uint32_t rid[MOE_MAX_TOPK];
			const double *xt = xd + (size_t)t * H;
			double *rt = ref + (size_t)t * H;

			for (uint32_t x_ = 0; x_ < E; x_++) {
				double s = 0;

				for (uint32_t j = 0; j < H; j++)
					s += (double)rw.router[(size_t)x_ * H + j] * xt[j];
				logit[x_] = s;
			}
			if (!ref_route(m, logit, rw.bias, rid, w)) {
				/* near-tie: take the engine's row as is */
				memcpy(rt, y + (size_t)t * H, H * sizeof(double));
				skipped++;
				continue;
			}
			for (uint32_t k = 0; k < K; k++) {
				const struct moe_expert_src *xs = &d->experts[rid[k]];
				float *g = read_mat(mr, &xs->gate), *u = read_mat(mr, &xs->up);
				float *dn = read_mat(mr, &xs->down);

				assert_int_equal(ids[(size_t)t * K + k], rid[k]);
				ffn(g, u, dn, I, H, xt, tmp);
				for (uint32_t j = 0; j < H; j++)
					rt[j] += w[k] * tmp[j];
				free(g), free(u), free(dn);
			}
			if (d->has_shared) {
				float *g = read_mat(mr, &d->shared.gate), *u = read_mat(mr, &d->shared.up);
				float *dn = read_mat(mr, &d->shared.down);
				double gate = 1;

				ffn(g, u, dn, m->shared_inter, H, xt, tmp);
				if (rw.sgate) {
					double z = 0;

					for (uint32_t j = 0; j < H; j++)
						z += (double)rw.sgate[j] * xt[j];
					gate = 1 / (1 + exp(-z));
				}
				for (uint32_t j = 0; j < H; j++)
					rt[j] += gate * tmp[j];
				free(g), free(u), free(dn);
			}
		}
		snprintf(what, sizeof(what), "%s layer %u vs float64", dir, d->index);
		assert_true(tu_check_rows(what, y, ref, n, H, 2e-5, 1e-5) <= 1);
		free(rw.router), free(rw.bias), free(rw.sgate);
		free(x), free(out), free(xd), free(y), free(ref), free(tmp), free(ids);
	}
	/* random inputs rarely land on a near-tie; a test that skips most
	 * tokens would test nothing */
	assert_true(skipped * 20 <= n * m->n_moe_layers);
	moe_model_free(mr);
	moe_engine_destroy(e);
	moe_model_free(m);
}

static char *synth(const struct moe_synth_opts *o)
{
	char *dir = tu_tmpdir(), err[MOE_ERRLEN];

	if (moe_synth_write(dir, o, err))
		fail_msg("%s", err);
	return dir;
}

/* Every family in f32, shapes with SIMD tails (H 200, I 72), both layouts,
 * sharded, and more tokens than one engine chunk (256). */
static void test_synthetic_families(void **state)
{
	for (int f = 0; f < MOE_FAM_COUNT; f++) {
		struct moe_synth_opts o;
		char *dir;

		moe_synth_defaults(&o, f);
		o.dtype = MOE_DT_F32;
		o.hidden = 200;
		o.inter = 72;
		o.experts = 16;
		o.top_k = f == MOE_FAM_MIXTRAL ? 2 : 4;
		o.layers = 2;
		o.seed = 100 + f;
		o.skew = 0.5f;
		if (o.shared_inter)
			o.shared_inter = f == MOE_FAM_QWEN2_MOE ? 96 : 72;
		if (f == MOE_FAM_DEEPSEEK_V3) {
			o.n_group = 4;
			o.topk_group = 2;
		}
		if (f == MOE_FAM_DEEPSEEK_V2) {
			o.group_limited = true;
			o.n_group = 4;
			o.topk_group = 2;
			o.routed_scale = 1.5f;
		}
		o.layout = f % 2 ? MOE_LAYOUT_FUSED : MOE_LAYOUT_PER_EXPERT;
		o.shards = f % 3 == 0 ? 3 : 1;
		dir = synth(&o);
		check_synthetic(dir, f == MOE_FAM_QWEN3_MOE ? 300 : 40, 512);
		tu_rmtree(dir);
		free(dir);
	}
}

/* A token's output must not depend on its batch: one call of n tokens and n
 * calls of one token give the same bits, with 1 thread and with several. */
static void test_batch_invariance(void **state)
{
	struct moe_synth_opts o;
	struct moe_model *m1, *m2;
	struct moe_engine *e1, *e2;
	struct moe_rng r = {3};
	const uint32_t n = 300;
	char *dir;

	moe_synth_defaults(&o, MOE_FAM_QWEN2_MOE);
	o.hidden = 96, o.inter = 40, o.shared_inter = 64, o.experts = 8, o.top_k = 2;
	dir = synth(&o);
	e1 = open_engine(dir, 1, 512, &m1);
	e2 = open_engine(dir, 2, 512, &m2);
	uint16_t *x = malloc((size_t)n * o.hidden * 2), *a = malloc((size_t)n * o.hidden * 2),
		 *b = malloc((size_t)n * o.hidden * 2);
	for (size_t i = 0; i < (size_t)n * o.hidden; i++)
		x[i] = moe_f32_to_bf16((float)moe_rng_normal(&r));
	forward(e1, 0, MOE_DT_BF16, x, a, n, NULL, NULL);
	for (uint32_t t = 0; t < n; t += 7) {
		uint32_t c = n - t < 7 ? n - t : 7;

		forward(e2, 0, MOE_DT_BF16, x + (size_t)t * o.hidden, b + (size_t)t * o.hidden, c,
			NULL, NULL);
	}
	assert_memory_equal(a, b, (size_t)n * o.hidden * 2);
	free(x), free(a), free(b);
	moe_engine_destroy(e1), moe_engine_destroy(e2);
	moe_model_free(m1), moe_model_free(m2);
	tu_rmtree(dir);
	free(dir);
}

static void test_forward_errors(void **state)
{
	char dir[1024], err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e;
	float x[100 * 4] = {0}, y[100 * 4];
	struct moe_epoch *ep;

	snprintf(dir, sizeof(dir), "%s/qwen2_moe_bf16", MOE_FIXTURES_DIR);
	e = open_engine(dir, 1, 4, &m);
	ep = moe_epoch_acquire(e);
	struct moe_batch dense = {1, 1, MOE_DT_F32, x, y, NULL, NULL, 0, NULL, NULL}; /* dense layer */
	struct moe_batch big = {0, 5, MOE_DT_F32, x, y, NULL, NULL, 0, NULL, NULL};
	struct moe_batch none = {99, 1, MOE_DT_F32, x, y, NULL, NULL, 0, NULL, NULL};
	struct moe_batch bad = {0, 1, (enum moe_dtype)7, x, y, NULL, NULL, 0, NULL, NULL};
	struct moe_seg segs[2] = {{x, y, MOE_DT_F32, 2, NULL, NULL}, {x, y, MOE_DT_F32, 0, NULL, NULL}};
	struct moe_batch sum = {.layer = 0, .n_tokens = 3, .n_segs = 1, .segs = segs};
	struct moe_batch empty = {.layer = 0, .n_tokens = 2, .n_segs = 2, .segs = segs};
	struct moe_seg bad_dt = {x, y, (enum moe_dtype)9, 1, NULL, NULL};
	struct moe_batch bad_seg = {.layer = 0, .n_tokens = 1, .n_segs = 1, .segs = &bad_dt};

	assert_int_equal(moe_engine_forward(e, ep, &dense, err), -EINVAL);
	assert_non_null(strstr(err, "layer 1 is not an MoE layer"));
	assert_int_equal(moe_engine_forward(e, ep, &none, err), -EINVAL);
	assert_int_equal(moe_engine_forward(e, ep, &big, err), -E2BIG);
	assert_non_null(strstr(err, "max_batch_tokens 4"));
	assert_int_equal(moe_engine_forward(e, ep, &bad, err), -EINVAL);
	assert_int_equal(moe_engine_forward(e, ep, &sum, err), -EINVAL);
	assert_non_null(strstr(err, "segments hold 2 tokens, the batch 3"));
	assert_int_equal(moe_engine_forward(e, ep, &empty, err), -EINVAL);
	assert_non_null(strstr(err, "segment 1 has no tokens"));
	assert_int_equal(moe_engine_forward(e, ep, &bad_seg, err), -EINVAL);
	assert_false(moe_engine_lost(e));
	moe_epoch_release(ep);
	moe_engine_destroy(e);
	moe_model_free(m);
}

/* A batch of segments (one per request, each its own buffers and dtype,
 * as moed forms them) gives each request the same bits as running it
 * alone: the segment plumbing neither mixes rows nor dtypes. The chunk
 * boundary (1024 tokens) falls inside a segment. */
static void test_segments(void **state)
{
	static const enum moe_dtype dts[] = {MOE_DT_F32, MOE_DT_BF16, MOE_DT_F16, MOE_DT_BF16};
	static const uint32_t lens[] = {5, 1000, 37, 3};
	struct moe_synth_opts o;
	struct moe_model *m;
	struct moe_engine *e;
	struct moe_rng r = {11};
	struct moe_seg segs[4];
	void *in[4], *out[4], *ref[4];
	uint32_t n = 0;
	char *dir, err[MOE_ERRLEN];

	(void)state;
	moe_synth_defaults(&o, MOE_FAM_QWEN2_MOE);
	o.hidden = 64, o.inter = 32, o.shared_inter = 48, o.experts = 8, o.top_k = 2;
	dir = synth(&o);
	e = open_engine(dir, 2, 2048, &m);
	for (int i = 0; i < 4; i++) {
		size_t cnt = (size_t)lens[i] * o.hidden, sz = moe_dtype_size(dts[i]);

		float *v = malloc(cnt * sizeof(float));

		in[i] = malloc(cnt * sz), out[i] = malloc(cnt * sz), ref[i] = malloc(cnt * sz);
		for (size_t j = 0; j < cnt; j++)
			v[j] = (float)moe_rng_normal(&r);
		moe_cpu_from_f32(dts[i], v, in[i], cnt);
		free(v);
		memset(out[i], 0xa5, cnt * sz);
		segs[i] = (struct moe_seg){in[i], out[i], dts[i], lens[i], NULL, NULL};
		n += lens[i];
		forward(e, 0, dts[i], in[i], ref[i], lens[i], NULL, NULL);
	}
	{
		struct moe_epoch *ep = moe_epoch_acquire(e);
		struct moe_batch b = {.layer = 0, .n_tokens = n, .n_segs = 4, .segs = segs};

		if (moe_engine_forward(e, ep, &b, err))
			fail_msg("%s", err);
		moe_epoch_release(ep);
	}
	for (int i = 0; i < 4; i++) {
		assert_memory_equal(out[i], ref[i], (size_t)lens[i] * o.hidden * moe_dtype_size(dts[i]));
		free(in[i]), free(out[i]), free(ref[i]);
	}
	moe_engine_destroy(e);
	moe_model_free(m);
	tu_rmtree(dir);
	free(dir);
}

/* A lost device (here the engine's test hook, as a sticky CUDA error would
 * be) fails that batch and every later one with -ENOTRECOVERABLE. */
/* What moed -t prints for the workspaces is what an engine allocates: for
 * several token budgets and thread counts, with and without shared experts
 * (the sizing and the allocation walk one list). */
static void test_workspace_sizing(void **state)
{
	static const char *const fx[] = {"qwen2_moe_bf16", "mixtral_f32_fused"};
	static const uint32_t tokens[] = {1, 64, 300, 4096}, threads[] = {1, 3};

	(void)state;
	for (size_t f = 0; f < 2; f++) {
		for (size_t t = 0; t < 4; t++) {
			for (size_t k = 0; k < 2; k++) {
				struct moe_engine_opts o = {.threads = threads[k],
							    .max_batch_tokens = tokens[t],
							    .tuning.isa = isa_under_test};
				struct moe_model *m;
				struct moe_engine *e;
				char dir[512], err[MOE_ERRLEN];
				uint64_t want, got;

				snprintf(dir, sizeof(dir), "%s/%s", MOE_FIXTURES_DIR, fx[f]);
				if (moe_model_open(dir, NULL, &m, err))
					fail_msg("%s", err);
				if (moe_engine_create(m, &o, &e, err))
					fail_msg("%s", err);
				want = moe_engine_workspace_bytes(m, &o);
				got = moe_engine_allocated_workspace_bytes(e);
				if (want != got || !want)
					fail_msg("%s, %u tokens, %u threads: planned %llu bytes, "
						 "allocated %llu", fx[f], tokens[t], threads[k],
						 (unsigned long long)want, (unsigned long long)got);
				moe_engine_destroy(e);
				moe_model_free(m);
			}
		}
	}
}

/* Whether the mapping holding p is advised MADV_HUGEPAGE ("hg" among its
 * VmFlags in /proc/self/smaps). */
static bool advised_huge(const void *p)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	bool in = false, hg = false;

	if (!f)
		return false;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;

		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {
			in = (uintptr_t)p >= lo && (uintptr_t)p < hi;
		} else if (in && strncmp(line, "VmFlags:", 8) == 0) {
			hg = strstr(line, " hg") != NULL;
			break;
		}
	}
	fclose(f);
	return hg;
}

/* A CPU slot of 2 MiB or more starts on a 2 MiB boundary and is advised
 * MADV_HUGEPAGE (backend_cpu.c: decode streams it from memory); a smaller
 * one is plain pages. Both are writable end to end and freed whole. */
static void test_slot_pages(void **state)
{
	const struct moe_backend_ops *ops = &moe_backend_cpu;
	char dir[512], err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_pool *pool;
	struct moe_backend_tuning t = {.isa = isa_under_test};
	struct moe_rank r = {.ops = ops};
	struct moe_slot big = {0}, small = {0};
	bool thp = access("/sys/kernel/mm/transparent_hugepage/enabled", F_OK) == 0;
	uint32_t inter;

	(void)state;
	snprintf(dir, sizeof(dir), "%s/qwen2_moe_bf16", MOE_FIXTURES_DIR);
	if (moe_model_open(dir, NULL, &m, err))
		fail_msg("%s", err);
	assert_int_equal(moe_pool_create(1, &pool), 0);
	r.pool = pool;
	r.shape = (struct moe_rank_shape){.max_tokens = 8, .chunk = 8, .threads = 1,
					  .n_ranks = 1, .slots_per_rank = 1};
	if (ops->rank_init(&r, m, &t, err))
		fail_msg("%s", err);
	/* 3 matrices of hidden x inter: 6 MiB at 2 bytes a weight */
	inter = (uint32_t)((6u << 20) / (3u * m->hidden * 2u));
	if (ops->slot_alloc(&r, m, inter, &big, err) || ops->slot_alloc(&r, m, m->inter, &small, err))
		fail_msg("%s", err);
	assert_true(big.bytes >= (4u << 20));
	assert_true(small.bytes < (2u << 20));
	assert_int_equal((uintptr_t)big.mem & ((2u << 20) - 1), 0);
	memset(big.mem, 0x5a, big.bytes);
	memset(small.mem, 0x5a, small.bytes);
	if (thp)
		assert_true(advised_huge(big.mem));
	else
		printf("[  SKIPPED ] the MADV_HUGEPAGE check: this kernel has no transparent huge pages\n");
	assert_false(advised_huge(small.mem));
	ops->slot_free(&r, &big);
	ops->slot_free(&r, &small);
	assert_null(big.mem);
	ops->rank_fini(&r);
	moe_pool_destroy(pool);
	moe_model_free(m);
}

static void test_lost_device(void **state)
{
	char dir[1024], err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e;
	float x[4 * 128], y[4 * 128];
	struct moe_epoch *ep;
	struct moe_rng r = {5};

	(void)state;
	fault_at = 2;
	snprintf(dir, sizeof(dir), "%s/qwen2_moe_bf16", MOE_FIXTURES_DIR);
	e = open_engine(dir, 1, 4, &m);
	fault_at = 0;
	assert_true(m->hidden <= 128);
	for (size_t i = 0; i < sizeof(x) / sizeof(x[0]); i++)
		x[i] = (float)moe_rng_normal(&r);
	struct moe_batch b = {0, 2, MOE_DT_F32, x, y, NULL, NULL, 0, NULL, NULL};
	ep = moe_epoch_acquire(e);
	assert_int_equal(moe_engine_forward(e, ep, &b, err), 0);
	assert_false(moe_engine_lost(e));
	assert_int_equal(moe_engine_forward(e, ep, &b, err), -ENOTRECOVERABLE);
	assert_non_null(strstr(err, "MOED_TEST_ENGINE_FAULT"));
	assert_true(moe_engine_lost(e));
	assert_int_equal(moe_engine_forward(e, ep, &b, err), -ENOTRECOVERABLE);
	moe_epoch_release(ep);
	moe_engine_destroy(e);
	moe_model_free(m);
}

/* Backend selection: "cuda" without a GPU (or without CUDA built in) is a
 * clear error, an unknown backend too. */
static void test_backend_choice(void **state)
{
	char dir[1024], err[MOE_ERRLEN];
	struct moe_model *m;
	struct moe_engine *e = NULL;
	struct moe_engine_opts o = {.threads = 1, .max_batch_tokens = 4, .backend = "tpu"};

	(void)state;
	snprintf(dir, sizeof(dir), "%s/qwen2_moe_bf16", MOE_FIXTURES_DIR);
	if (moe_model_open(dir, NULL, &m, err))
		fail_msg("%s", err);
	assert_int_equal(moe_engine_create(m, &o, &e, err), -EINVAL);
	assert_non_null(strstr(err, "unknown backend \"tpu\""));
	o.backend = "cuda";
	o.device = 63;
	assert_true(moe_engine_create(m, &o, &e, err) < 0);
	/* without CUDA built: "built without CUDA"; with it and no GPU 63:
	 * "no usable GPU" or "GPU 63 requested" */
	assert_true(strstr(err, "without CUDA") || strstr(err, "GPU"));
	assert_null(e);
	moe_model_free(m);
}

/* ---- the checkpoint changing under the daemon ------------------------- */

struct rewrite {
	const char *path;
	int when, calls;
	bool truncate;
};

static void rewrite_hook(void *arg, const char *shard, const char *tensor)
{
	struct rewrite *rw = arg;
	struct stat st;
	int fd;

	if (++rw->calls != rw->when)
		return;
	fd = open(rw->path, O_WRONLY);
	assert_true(fd >= 0);
	assert_int_equal(fstat(fd, &st), 0);
	if (rw->truncate) {
		assert_int_equal(ftruncate(fd, st.st_size / 2), 0);
	} else {
		char junk[4096];

		memset(junk, 0x5a, sizeof(junk));
		/* overwrite the last 4 KiB of weights in place */
		assert_int_equal(pwrite(fd, junk, sizeof(junk), st.st_size - (off_t)sizeof(junk)),
				 (ssize_t)sizeof(junk));
	}
	close(fd);
}

static void load_with_rewrite(bool truncate, int when, const char *expect)
{
	struct moe_synth_opts o;
	struct moe_model_opts mo = {0};
	struct rewrite rw = {.when = when, .truncate = truncate};
	struct moe_model *m;
	struct moe_engine *e = NULL;
	struct moe_engine_opts eo = {.threads = 1};
	char *dir, path[1024], err[MOE_ERRLEN];
	int ret;

	moe_synth_defaults(&o, MOE_FAM_OLMOE);
	o.hidden = 64, o.inter = 32, o.experts = 8, o.top_k = 2;
	dir = synth(&o);
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	rw.path = path;
	mo.hook = rewrite_hook;
	mo.hook_arg = &rw;
	if (moe_model_open(dir, &mo, &m, err))
		fail_msg("%s", err);
	ret = moe_engine_create(m, &eo, &e, err);
	assert_true(ret < 0);
	assert_null(e);
	print_message("refused as expected: %s\n", err);
	assert_non_null(strstr(err, expect));
	assert_non_null(strstr(err, path));
	moe_model_free(m);
	tu_rmtree(dir);
	free(dir);
}

static void test_shard_modified_during_load(void **state)
{
	/* rewritten after the 3rd read: caught by the identity check after the
	 * last read */
	load_with_rewrite(false, 3, "modified while loading");
}

static void test_shard_truncated_during_load(void **state)
{
	/* truncated after the 2nd read: a later read comes up short */
	load_with_rewrite(true, 2, "truncated");
}

/* Once loaded, the weights are the daemon's: a shard overwritten with junk
 * or truncated afterwards changes nothing. */
static void test_shard_overwritten_after_load(void **state)
{
	char dir[1024], path[1100], cmd[2300];
	struct moe_model *m;
	struct moe_engine *e;
	struct moe_rng r = {11};
	char *tmp = tu_tmpdir();
	float x[24 * 72], a[24 * 72], b[24 * 72];
	int fd;

	snprintf(dir, sizeof(dir), "%s/mixtral_bf16", MOE_FIXTURES_DIR);
	snprintf(cmd, sizeof(cmd), "cp %s/config.json %s/model.safetensors %s/", dir, dir, tmp);
	assert_int_equal(system(cmd), 0);
	e = open_engine(tmp, 2, 64, &m);
	assert_int_equal(m->hidden, 72);
	for (size_t i = 0; i < 24 * 72; i++)
		x[i] = (float)moe_rng_normal(&r);
	forward(e, 0, MOE_DT_F32, x, a, 24, NULL, NULL);

	snprintf(path, sizeof(path), "%s/model.safetensors", tmp);
	fd = open(path, O_WRONLY);
	assert_true(fd >= 0);
	for (off_t off = 0; off < 1 << 20; off += 4096) {
		char junk[4096];

		memset(junk, 0xff, sizeof(junk));
		if (pwrite(fd, junk, sizeof(junk), off) != (ssize_t)sizeof(junk))
			break;
	}
	assert_int_equal(ftruncate(fd, 100), 0);
	close(fd);

	forward(e, 0, MOE_DT_F32, x, b, 24, NULL, NULL);
	assert_memory_equal(a, b, sizeof(a));
	moe_engine_destroy(e);
	moe_model_free(m);
	tu_rmtree(tmp);
	free(tmp);
}

static int run_all(const char *isa)
{
	struct CMUnitTest tests[sizeof(cases) / sizeof(cases[0]) + 16];
	char group[64];
	size_t n = 0;

	isa_under_test = isa;
	snprintf(group, sizeof(group), "engine (%s kernels)", isa);

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		tests[n++] = (struct CMUnitTest){cases[i], test_fixture, NULL, NULL,
						 (void *)cases[i]};
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_synthetic_families);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_batch_invariance);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_forward_errors);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_segments);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_lost_device);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_workspace_sizing);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_slot_pages);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_backend_choice);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_shard_modified_during_load);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_shard_truncated_during_load);
	tests[n++] = (struct CMUnitTest)cmocka_unit_test(test_shard_overwritten_after_load);
	return _cmocka_run_group_tests(group, tests, n, NULL, NULL);
}

/* Every CPU path the machine supports runs the whole suite; the others are
 * named as skipped. */
int main(void)
{
	int failed = 0;

	for (int i = 0; i < MOE_ISA_COUNT; i++) {
		const char *name = moe_cpu_isa_name((enum moe_cpu_isa)i);

		if (!moe_cpu_isa_supported((enum moe_cpu_isa)i)) {
			printf("engine (%s kernels): SKIPPED, this CPU lacks %s\n", name, name);
			continue;
		}
		printf("engine (%s kernels): run\n", name);
		failed += run_all(name);
	}
	return failed;
}
