/* tests/test_kernels.c — kernels/cpu against float64 references on random
 * data.
 *
 * Conversions are exact: every f16/bf16 pattern is decoded and compared with
 * its mathematical value, and f32 -> bf16/f16 rounding is compared with a
 * round-to-nearest-even computed in double. The matmul tolerance is
 * |y - ref| <= 1e-6 * sum_t |x_t w_t| (fp32 accumulation over 8 lanes has an
 * error bound of about (k/8 + 3) * 2^-24 * sum |x_t w_t|; k <= 300 here).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/convert.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/pairs.h"
#include "kernels/cpu/panel.h"
#include "kernels/cpu/route.h"
#include "kernels/cpu/swiglu.h"
#include "tests/testutil.h"
#include "tools/synth.h"

static float rand_float(struct moe_rng *r)
{
	/* wide dynamic range: sign, exponent 2^-30..2^20, random mantissa */
	double m = 1 + moe_rng_uniform(r);
	int e = (int)(moe_rng_next(r) % 50) - 30;

	return (float)((moe_rng_next(r) & 1 ? -1 : 1) * ldexp(m, e));
}

static void test_bf16_decode_and_round(void **state)
{
	struct moe_rng r = {1};

	for (uint32_t h = 0; h < 65536; h++) {
		float f = moe_bf16_to_f32((uint16_t)h);
		uint32_t bits;

		memcpy(&bits, &f, 4);
		assert_int_equal(bits, h << 16);
	}
	for (int i = 0; i < 200000; i++) {
		float x = i < 100000 ? rand_float(&r) : (float)moe_rng_normal(&r);
		uint32_t b;
		double lo, hi, got = moe_bf16_to_f32(moe_f32_to_bf16(x));

		memcpy(&b, &x, 4);
		lo = moe_bf16_to_f32((uint16_t)(b >> 16));
		hi = moe_bf16_to_f32((uint16_t)((b >> 16) + 1));
		double dl = fabs((double)x - lo), dh = fabs(hi - (double)x);
		double want = dl < dh ? lo : dh < dl ? hi : (((b >> 16) & 1) ? hi : lo);

		if (got != want)
			fail_msg("bf16(%a) = %a, want %a", (double)x, got, want);
	}
	assert_true(isnan(moe_bf16_to_f32(moe_f32_to_bf16(NAN))));
	assert_true(isinf(moe_bf16_to_f32(moe_f32_to_bf16(INFINITY))));

	/* the bulk rounding (a loop the compiler vectorizes) gives the same
	 * bits as the scalar one: random bit patterns, NaNs, infinities, the
	 * edges of each rounding case, denormals */
	enum { NB = 1 << 16 };
	static const uint32_t special[] = {0x7f800000, 0xff800000, 0x7f800001, 0x7fc00000,
					   0xffffffff, 0x7f7fffff, 0x7f7f8000, 0x00008000,
					   0x00018000, 0x00017fff, 0x80000001, 0x3f808000};
	uint32_t *v = malloc(NB * 4), *w = malloc(NB * 4);

	for (int round = 0; round < 16; round++) {
		for (uint32_t i = 0; i < NB; i++)
			v[i] = i < 12 ? special[i] : (uint32_t)moe_rng_next(&r);
		memcpy(w, v, NB * 4);
		moe_cpu_round(MOE_DT_BF16, (float *)w, NB);
		for (uint32_t i = 0; i < NB; i++) {
			float f, want;
			uint32_t b;

			memcpy(&f, &v[i], 4);
			want = moe_round_to(MOE_DT_BF16, f);
			memcpy(&b, &want, 4);
			if (w[i] != b)
				fail_msg("moe_cpu_round(bf16) of bits %08x: %08x, want %08x", v[i],
					 w[i], b);
		}
	}
	free(v);
	free(w);
}

static double f16_value(uint16_t h)
{
	int e = (h >> 10) & 31, m = h & 1023;
	double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);

	if (e == 31)
		v = m ? NAN : INFINITY;
	return h & 0x8000 ? -v : v;
}

/* nearest f16 value of x, ties to even, overflow to inf */
static double f16_round_ref(double x)
{
	double a = fabs(x), ulp, q;
	int e;

	if (a == 0)
		return x;
	e = (int)floor(log2(a));
	if (e < -14)
		e = -14;
	ulp = ldexp(1, e - 10);
	q = nearbyint(a / ulp) * ulp; /* default rounding mode: to nearest even */
	if (q >= 65520)
		q = INFINITY;
	return x < 0 ? -q : q;
}

static void test_f16_decode_and_round(void **state)
{
	struct moe_rng r = {2};

	for (uint32_t h = 0; h < 65536; h++) {
		double want = f16_value((uint16_t)h), got = moe_f16_to_f32((uint16_t)h);

		if (isnan(want))
			assert_true(isnan(got));
		else if (got != want)
			fail_msg("f16 %04x decodes to %a, want %a", h, got, want);
	}
	for (int i = 0; i < 200000; i++) {
		float x = i % 2 ? rand_float(&r) : (float)(moe_rng_normal(&r) * 1e-5);
		double want = f16_round_ref(x), got = moe_f16_to_f32(moe_f32_to_f16(x));

		if (got != want)
			fail_msg("f16(%a) = %a, want %a", (double)x, got, want);
	}
	/* exact halfway points round to even */
	assert_true(moe_f16_to_f32(moe_f32_to_f16(1.0f + ldexpf(1, -11))) == 1.0f);
	assert_true(moe_f16_to_f32(moe_f32_to_f16(1.0f + 3 * ldexpf(1, -11))) ==
		    1.0f + ldexpf(1, -9));
	assert_true(isinf(moe_f16_to_f32(moe_f32_to_f16(65520.0f))));
	assert_true(moe_f16_to_f32(moe_f32_to_f16(65519.0f)) == 65504.0f);
}

static void check_matmul(enum moe_dtype dt, uint32_t m, uint32_t k, uint32_t n,
			 struct moe_rng *r)
{
	float *x = malloc((size_t)m * k * 4), *wf = malloc((size_t)n * k * 4);
	float *y = malloc((size_t)m * (n + 3) * 4), *scr = malloc(MOE_MATMUL_WBLOCK * k * 4);
	void *w = malloc((size_t)n * k * 4);

	for (size_t i = 0; i < (size_t)m * k; i++)
		x[i] = (float)moe_rng_normal(r);
	for (size_t i = 0; i < (size_t)n * k; i++)
		wf[i] = (float)moe_rng_normal(r);
	moe_cpu_from_f32(dt, wf, w, (size_t)n * k);
	moe_cpu_to_f32(dt, w, wf, (size_t)n * k); /* the values the kernel sees */
	/* ldy = n + 3: the kernel must write only its n columns */
	for (size_t i = 0; i < (size_t)m * (n + 3); i++)
		y[i] = 12345.0f;
	moe_cpu_matmul_nt(x, k, m, k, w, dt, n, y, n + 3, scr);
	for (uint32_t i = 0; i < m; i++) {
		for (uint32_t j = 0; j < n; j++) {
			double ref = 0, mag = 0;

			for (uint32_t t = 0; t < k; t++) {
				ref += (double)x[(size_t)i * k + t] * wf[(size_t)j * k + t];
				mag += fabs((double)x[(size_t)i * k + t] * wf[(size_t)j * k + t]);
			}
			if (fabs(y[(size_t)i * (n + 3) + j] - ref) > 1e-6 * mag + 1e-30)
				fail_msg("%s m%u k%u n%u: y[%u,%u] = %.9g, want %.9g",
					 moe_dtype_name(dt), m, k, n, i, j,
					 (double)y[(size_t)i * (n + 3) + j], ref);
		}
		for (uint32_t j = n; j < n + 3; j++)
			assert_true(y[(size_t)i * (n + 3) + j] == 12345.0f);
	}
	free(x), free(wf), free(y), free(scr), free(w);
}

static void test_matmul(void **state)
{
	static const uint32_t ms[] = {1, 3, 17}, ks[] = {1, 7, 33, 200, 300}, ns[] = {1, 5, 66};
	struct moe_rng r = {3};

	for (int d = 0; d < 3; d++)
		for (size_t a = 0; a < 3; a++)
			for (size_t b = 0; b < 5; b++)
				for (size_t c = 0; c < 3; c++)
					check_matmul((enum moe_dtype)d, ms[a], ks[b], ns[c], &r);
}

static void test_swiglu(void **state)
{
	struct moe_rng r = {4};
	float g[333], u[333], h[333];

	for (int i = 0; i < 333; i++) {
		g[i] = (float)(4 * moe_rng_normal(&r));
		u[i] = (float)moe_rng_normal(&r);
	}
	moe_cpu_swiglu(g, u, h, 333);
	for (int i = 0; i < 333; i++) {
		double ref = g[i] / (1 + exp(-(double)g[i])) * u[i];

		assert_true(fabs(h[i] - ref) <= 1e-6 * fabs(ref) + 1e-12);
	}
}

static void route(const struct moe_route_params *p, const float *logits, uint32_t n,
		  uint32_t *ids, float *w)
{
	float scratch[MOE_ROUTE_SCRATCH(MOE_MAX_EXPERTS)];

	moe_cpu_route(p, logits, n, ids, w, scratch);
}

/* softmax, top-k, renormalise: hand-checked values */
static void test_route_softmax(void **state)
{
	struct moe_route_params p = {.n_experts = 4, .top_k = 2, .score = MOE_SCORE_SOFTMAX,
				     .scale = 1};
	const float l[4] = {0.0f, 2.0f, 1.0f, -1.0f};
	double z = 1 + exp(2) + exp(1) + exp(-1);
	uint32_t ids[2];
	float w[2];

	route(&p, l, 1, ids, w);
	assert_int_equal(ids[0], 1);
	assert_int_equal(ids[1], 2);
	assert_true(fabs(w[0] - exp(2) / z) < 1e-6);
	assert_true(fabs(w[1] - exp(1) / z) < 1e-6);
	p.renormalize = true;
	route(&p, l, 1, ids, w);
	assert_true(fabs(w[0] - exp(2) / (exp(2) + exp(1))) < 1e-6);
	assert_true(fabs(w[0] + w[1] - 1) < 1e-6);
	/* exact tie: lower index first */
	const float t[4] = {1.0f, 3.0f, 3.0f, 3.0f};
	route(&p, t, 1, ids, w);
	assert_int_equal(ids[0], 1);
	assert_int_equal(ids[1], 2);
}

/* DeepSeek-V3: selection on sigmoid + bias within the best groups (sum of
 * each group's top 2), weights from the unbiased sigmoid, renormalised and
 * scaled. A dropped group's expert never wins, even against a kept expert
 * whose biased score is negative. */
static void test_route_groups(void **state)
{
	float bias[8] = {0, 0, 0, 0, -2, -2, 0, 0};
	struct moe_route_params p = {.n_experts = 8, .top_k = 2, .score = MOE_SCORE_SIGMOID,
				     .group = MOE_GROUP_SUM_TOP2, .n_group = 4, .topk_group = 2,
				     .renormalize = true, .renorm_eps = 1e-20f, .scale = 2.5f,
				     .bias = bias};
	/* groups {0,1} {2,3} {4,5} {6,7} */
	const float l[8] = {3.0f, 2.9f, -1.0f, -1.0f, 5.0f, 5.0f, 1.0f, 0.5f};
	uint32_t ids[2];
	float w[2];
	double s0 = 1 / (1 + exp(-3.0)), s1 = 1 / (1 + exp(-2.9));

	/* group sums: g0 ~1.9, g1 ~0.54, g2 ~2*(0.993-2) < 0, g3 ~1.35 ->
	 * keep g0 and g3; the best two experts are 0 and 1 */
	route(&p, l, 1, ids, w);
	assert_int_equal(ids[0], 0);
	assert_int_equal(ids[1], 1);
	assert_true(fabs(w[0] - 2.5 * s0 / (s0 + s1)) < 1e-6);
	assert_true(fabs(w[1] - 2.5 * s1 / (s0 + s1)) < 1e-6);

	/* kept experts with negative biased scores still beat dropped ones */
	float bias2[8] = {-3, -3, 0, 0, 0, 0, 0, 0};
	const float l2[8] = {9.0f, 8.0f, -9.0f, -9.0f, -9.0f, -9.0f, -9.0f, -9.0f};
	p.bias = bias2;
	p.topk_group = 1;
	route(&p, l2, 1, ids, w);
	/* g0 sum = 2*(~1 - 3) = ~-4 < others (~2*0.0001): g0 is dropped */
	assert_true(ids[0] >= 2 && ids[1] >= 2);
	assert_true(ids[0] / 2 == ids[1] / 2);

	/* DeepSeek-V2 group-limited: group score is the max probability */
	struct moe_route_params p2 = {.n_experts = 8, .top_k = 2, .score = MOE_SCORE_SOFTMAX,
				      .group = MOE_GROUP_MAX, .n_group = 4, .topk_group = 1,
				      .scale = 1.5f};
	const float l3[8] = {1.0f, 1.1f, 3.0f, -5.0f, 2.0f, 2.5f, 0, 0};
	route(&p2, l3, 1, ids, w);
	/* best group by max is {2,3}: both picks come from it */
	assert_int_equal(ids[0], 2);
	assert_int_equal(ids[1], 3);
}

/* One ISA path's panel kernels against float64, every dtype, token counts
 * across the micro-kernel heights (6 for AVX2, 12 for AVX-512), K with
 * tails, partial last panels. Tolerance: sequential fp32 summation over K
 * terms is within (K + 2) * 2^-24 * sum |x_k w_k| of the exact sum.
 * Then batch invariance: every token alone gives the same bits. */
static void check_panels(enum moe_cpu_isa isa, enum moe_dtype dt, uint32_t m, uint32_t K,
			 uint32_t n, double xs, struct moe_rng *r)
{
	const struct moe_cpu_kernels *kn = moe_cpu_kernels_for(isa);
	float *x = malloc((size_t)m * K * 4), *wf = malloc((size_t)2 * n * K * 4);
	void *w = malloc((size_t)2 * n * K * 4);
	void *pr = malloc(moe_pack_rows_bytes(n, K, dt));
	void *pg = malloc(moe_pack_gate_up_bytes(n, K, dt));
	float *y = malloc((size_t)m * (n + 1) * 4), *sc = malloc(m * 4);
	float *y1 = malloc((size_t)(n + 1) * 4);
	double bound = (K + 2) * ldexp(1, -24);

	for (size_t i = 0; i < (size_t)m * K; i++)
		x[i] = (float)(xs * moe_rng_normal(r));
	for (uint32_t t = 0; t < m; t++)
		sc[t] = (float)moe_rng_uniform(r) + 0.5f;
	for (size_t i = 0; i < (size_t)2 * n * K; i++)
		wf[i] = (float)moe_rng_normal(r);
	moe_cpu_from_f32(dt, wf, w, (size_t)2 * n * K);
	moe_cpu_to_f32(dt, w, wf, (size_t)2 * n * K);
	moe_pack_rows(w, n, K, dt, pr);
	moe_pack_gate_up(w, (char *)w + (size_t)n * K * moe_dtype_size(dt), n, K, dt, pg);

	/* rows: y = scale * x W^T, the last column of y is a guard */
	for (size_t i = 0; i < (size_t)m * (n + 1); i++)
		y[i] = -7.0f;
	kn->rows(x, K, m, pr, dt, K, n, y, n + 1, sc);
	for (uint32_t t = 0; t < m; t++) {
		for (uint32_t j = 0; j < n; j++) {
			double ref = 0, mag = 0;

			for (uint32_t k = 0; k < K; k++) {
				double v = (double)x[(size_t)t * K + k] * wf[(size_t)j * K + k];

				ref += v;
				mag += fabs(v);
			}
			ref *= sc[t];
			if (fabs(y[(size_t)t * (n + 1) + j] - ref) > bound * mag * sc[t] * 1.0001 + 1e-30)
				fail_msg("%s rows %s m%u K%u n%u: y[%u,%u] = %.9g, want %.9g",
					 moe_cpu_isa_name(isa), moe_dtype_name(dt), m, K, n, t, j,
					 (double)y[(size_t)t * (n + 1) + j], ref);
		}
		assert_true(y[(size_t)t * (n + 1) + n] == -7.0f);
	}
	for (uint32_t t = 0; t < m; t++) {
		kn->rows(x + (size_t)t * K, K, 1, pr, dt, K, n, y1, n + 1, sc + t);
		if (memcmp(y1, y + (size_t)t * (n + 1), (size_t)n * 4))
			fail_msg("%s rows %s m%u K%u n%u: token %u alone gives other bits",
				 moe_cpu_isa_name(isa), moe_dtype_name(dt), m, K, n, t);
	}
	/* the same weights widened to f32 panels: the same bits (the CPU
	 * backend packs the router in the model's dtype on that ground) */
	if (dt != MOE_DT_F32) {
		void *pf = malloc(moe_pack_rows_bytes(n, K, MOE_DT_F32));
		float *yf = malloc((size_t)m * (n + 1) * 4);

		moe_pack_rows(wf, n, K, MOE_DT_F32, pf);
		kn->rows(x, K, m, pf, MOE_DT_F32, K, n, yf, n + 1, sc);
		for (uint32_t t = 0; t < m; t++)
			if (memcmp(yf + (size_t)t * (n + 1), y + (size_t)t * (n + 1), (size_t)n * 4))
				fail_msg("%s rows %s m%u K%u n%u: token %u differs from f32 panels "
					 "of the same values", moe_cpu_isa_name(isa),
					 moe_dtype_name(dt), m, K, n, t);
		free(pf);
		free(yf);
	}

	/* gate/up + SwiGLU: h = silu(x Wg^T) * (x Wu^T) */
	for (size_t i = 0; i < (size_t)m * (n + 1); i++)
		y[i] = -7.0f;
	kn->gate_up(x, K, m, pg, dt, K, n, y, n + 1);
	for (uint32_t t = 0; t < m; t++) {
		for (uint32_t j = 0; j < n; j++) {
			double g = 0, u = 0, mg = 0, mu = 0, ref, dg, du;
			const float *wg = wf + (size_t)j * K, *wu = wf + ((size_t)n + j) * K;

			for (uint32_t k = 0; k < K; k++) {
				g += (double)x[(size_t)t * K + k] * wg[k];
				u += (double)x[(size_t)t * K + k] * wu[k];
				mg += fabs((double)x[(size_t)t * K + k] * wg[k]);
				mu += fabs((double)x[(size_t)t * K + k] * wu[k]);
			}
			ref = g / (1 + exp(-g)) * u;
			/* |d silu(g)/dg| <= 1.1: propagate both sum errors, plus
			 * a few ulps for expf and the products */
			dg = 1.1 * bound * mg * fabs(u), du = fabs(g / (1 + exp(-g))) * bound * mu;
			if (fabs(y[(size_t)t * (n + 1) + j] - ref) >
			    dg + du + 1e-6 * fabs(ref) + 1e-30)
				fail_msg("%s gate_up %s m%u K%u n%u: h[%u,%u] = %.9g, want %.9g",
					 moe_cpu_isa_name(isa), moe_dtype_name(dt), m, K, n, t, j,
					 (double)y[(size_t)t * (n + 1) + j], ref);
		}
		assert_true(y[(size_t)t * (n + 1) + n] == -7.0f);
	}
	for (uint32_t t = 0; t < m; t++) {
		kn->gate_up(x + (size_t)t * K, K, 1, pg, dt, K, n, y1, n + 1);
		if (memcmp(y1, y + (size_t)t * (n + 1), (size_t)n * 4))
			fail_msg("%s gate_up %s m%u K%u n%u: token %u alone gives other bits",
				 moe_cpu_isa_name(isa), moe_dtype_name(dt), m, K, n, t);
	}
	free(x), free(wf), free(w), free(pr), free(pg), free(y), free(sc), free(y1);
}

static void test_panels(void **state)
{
	/* every tile height of both paths, alone and after full tiles */
	static const uint32_t ms[] = {1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 15, 16, 25};
	static const uint32_t ks[] = {1, 7, 33, 300};
	static const uint32_t ns[] = {1, 8, 15, 16, 17, 40, 70};
	struct moe_rng r = {5};
	int ran = 0;

	for (int isa = 0; isa < MOE_ISA_COUNT; isa++) {
		if (moe_cpu_isa_bf16((enum moe_cpu_isa)isa))
			continue; /* their fp32 kernels are avx512's; test_pairs */
		if (!moe_cpu_isa_supported((enum moe_cpu_isa)isa)) {
			print_message("panel kernels: %s path SKIPPED (this CPU lacks it)\n",
				      moe_cpu_isa_name((enum moe_cpu_isa)isa));
			continue;
		}
		print_message("panel kernels: %s path tested\n",
			      moe_cpu_isa_name((enum moe_cpu_isa)isa));
		ran++;
		for (int d = 0; d < 3; d++)
			for (size_t a = 0; a < sizeof(ms) / sizeof(ms[0]); a++)
				for (size_t b = 0; b < sizeof(ks) / sizeof(ks[0]); b++)
					for (size_t c = 0; c < sizeof(ns) / sizeof(ns[0]); c++)
						check_panels((enum moe_cpu_isa)isa,
							     (enum moe_dtype)d, ms[a], ks[b],
							     ns[c], 1.0, &r);
		/* gate sums of +-several hundred: the SwiGLU where e^-g
		 * overflows or vanishes (the vector exp's clamps) */
		for (int d = 0; d < 3; d++)
			check_panels((enum moe_cpu_isa)isa, (enum moe_dtype)d, 7, 300, 40, 30.0,
				     &r);
	}
	assert_true(ran >= 1);
}

static uint16_t bf16_normal(struct moe_rng *r)
{
	return moe_f32_to_bf16((float)moe_rng_normal(r));
}

/* One bf16 path's kernels (pairs.h) against float64 on bf16 data: token
 * counts across the tile heights (12 for avx512bf16, 16/32 for amx), K with
 * tails (padded to 32), partial last panels. Tolerances: the sums as in
 * check_panels ((K + 2) * 2^-24 * sum |x_k w_k|, whatever the order, plus
 * K * 2^-126 for the denormals both instructions flush); h is rounded to
 * bf16, which adds at most 2^-8 * |h|, and its exp is within 2e-6.
 * Then batch invariance: every token alone gives the same bits. */
static void check_pairs(const struct moe_pairs_kernels *kn, uint32_t m, uint32_t K, uint32_t n,
			struct moe_rng *r)
{
	uint32_t kp = moe_pairs_kp(K), ldh = (n + 15) / 16 * 16 + 16;
	size_t xrows = m + MOE_PAIRS_SLACK_ROWS;
	uint16_t *x = calloc(xrows * kp, 2), *w = malloc((size_t)2 * n * K * 2);
	uint16_t *h = malloc((size_t)m * ldh * 2), *h1 = malloc((size_t)ldh * 2);
	void *pr = aligned_alloc(64, moe_pairs_rows_bytes(n, K));
	void *pg = aligned_alloc(64, moe_pairs_gate_up_bytes(n, K));
	/* y's rows 64-byte aligned, past a guard column: from 64 tokens the
	 * kernels stream whole lines (moe_store_rows512) */
	uint32_t ldy = (n + 16) / 16 * 16;
	float *y = aligned_alloc(64, (size_t)m * ldy * 4), *y1 = malloc((size_t)ldy * 4);
	float *sc = malloc(m * 4);
	double bound = (K + 2) * ldexp(1, -24), tiny = K * ldexp(1, -126);

	for (uint32_t t = 0; t < m; t++) {
		for (uint32_t k = 0; k < K; k++)
			x[(size_t)t * kp + k] = bf16_normal(r);
		sc[t] = (float)moe_rng_uniform(r) + 0.5f;
	}
	for (size_t i = m * (size_t)kp; i < xrows * kp; i++) /* slack: anything */
		x[i] = bf16_normal(r);
	for (size_t i = 0; i < (size_t)2 * n * K; i++)
		w[i] = bf16_normal(r);
	moe_pairs_pack_rows(w, n, K, pr);
	moe_pairs_pack_gate_up(w, w + (size_t)n * K, n, K, pg);

	for (size_t i = 0; i < (size_t)m * ldy; i++)
		y[i] = -7.0f;
	kn->rows(x, kp, m, pr, K, n, y, ldy, sc);
	for (uint32_t t = 0; t < m; t++) {
		for (uint32_t j = 0; j < n; j++) {
			double ref = 0, mag = 0;

			for (uint32_t k = 0; k < K; k++) {
				double v = (double)moe_bf16_to_f32(x[(size_t)t * kp + k]) *
					   moe_bf16_to_f32(w[(size_t)j * K + k]);

				ref += v;
				mag += fabs(v);
			}
			ref *= sc[t];
			if (fabs(y[(size_t)t * ldy + j] - ref) >
			    (bound * mag * 1.0001 + tiny) * sc[t] + 1e-30)
				fail_msg("%s rows m%u K%u n%u: y[%u,%u] = %.9g, want %.9g",
					 moe_cpu_isa_name(kn->isa), m, K, n, t, j,
					 (double)y[(size_t)t * ldy + j], ref);
		}
		assert_true(y[(size_t)t * ldy + n] == -7.0f);
		for (uint32_t j = 0; j < ldy; j++)
			y1[j] = -7.0f;
		kn->rows(x + (size_t)t * kp, kp, 1, pr, K, n, y1, ldy, sc + t);
		if (memcmp(y1, y + (size_t)t * ldy, ldy * 4))
			fail_msg("%s rows m%u K%u n%u: token %u alone differs", moe_cpu_isa_name(kn->isa),
				 m, K, n, t);
	}

	for (size_t i = 0; i < (size_t)m * ldh; i++)
		h[i] = 0x7fc1; /* a NaN: the guard */
	kn->gate_up(x, kp, m, pg, K, n, h, ldh);
	for (uint32_t t = 0; t < m; t++) {
		for (uint32_t j = 0; j < n; j++) {
			double g = 0, u = 0, mg = 0, mu = 0, ref, dg, du;
			const uint16_t *wg = w + (size_t)j * K, *wu = w + ((size_t)n + j) * K;
			double got = moe_bf16_to_f32(h[(size_t)t * ldh + j]);

			for (uint32_t k = 0; k < K; k++) {
				double xv = moe_bf16_to_f32(x[(size_t)t * kp + k]);

				g += xv * moe_bf16_to_f32(wg[k]);
				u += xv * moe_bf16_to_f32(wu[k]);
				mg += fabs(xv * moe_bf16_to_f32(wg[k]));
				mu += fabs(xv * moe_bf16_to_f32(wu[k]));
			}
			ref = g / (1 + exp(-g)) * u;
			dg = 1.1 * (bound * mg + tiny) * fabs(u);
			du = fabs(g / (1 + exp(-g))) * (bound * mu + tiny);
			if (fabs(got - ref) > (dg + du) * 1.01 + (ldexp(1, -8) + 2e-6) * fabs(ref) + 1e-30)
				fail_msg("%s gate_up m%u K%u n%u: h[%u,%u] = %.9g, want %.9g",
					 moe_cpu_isa_name(kn->isa), m, K, n, t, j, got, ref);
		}
		for (uint32_t j = n; j < (n + 15) / 16 * 16; j++) /* the block's tail: zero */
			assert_int_equal(h[(size_t)t * ldh + j], 0);
		for (uint32_t j = (n + 15) / 16 * 16; j < ldh; j++) /* past it: untouched */
			assert_int_equal(h[(size_t)t * ldh + j], 0x7fc1);
		kn->gate_up(x + (size_t)t * kp, kp, 1, pg, K, n, h1, ldh);
		if (memcmp(h1, h + (size_t)t * ldh, (n + 15) / 16 * 16 * 2))
			fail_msg("%s gate_up m%u K%u n%u: token %u alone differs",
				 moe_cpu_isa_name(kn->isa), m, K, n, t);
	}
	free(x), free(w), free(h), free(h1), free(pr), free(pg), free(y), free(y1), free(sc);
}

static void test_pairs(void **state)
{
	static const uint32_t ms[] = {1, 2, 5, 12, 13, 16, 17, 31, 32, 33, 50, 64, 70};
	/* 2100: past 64 steps, where the AMX kernel parks its accumulators */
	static const uint32_t ks[] = {1, 32, 33, 100, 300, 2100}, ns[] = {1, 15, 16, 17, 40, 70};
	static const enum moe_cpu_isa paths[] = {MOE_ISA_AVX512BF16, MOE_ISA_AMX};
	struct moe_rng r = {9};
	char err[200];

	for (size_t i = 0; i < 2; i++) {
		const char *name = moe_cpu_isa_name(paths[i]);

		if (!moe_cpu_isa_supported(paths[i])) {
			print_message("pairs kernels: %s path SKIPPED (this CPU lacks it)\n", name);
			continue;
		}
		if (paths[i] == MOE_ISA_AMX && moe_cpu_amx_enable(err, sizeof(err))) {
			print_message("pairs kernels: amx path SKIPPED (%s)\n", err);
			continue;
		}
		print_message("pairs kernels: %s path tested\n", name);
		for (size_t a = 0; a < sizeof(ms) / 4; a++)
			for (size_t b = 0; b < sizeof(ks) / 4; b++)
				for (size_t c = 0; c < sizeof(ns) / 4; c++)
					check_pairs(moe_pairs_kernels_for(paths[i]), ms[a], ks[b],
						    ns[c], &r);
	}
}

/* Forcing a path: by name (from cpu.isa or MOE_CPU_ISA, as the message
 * says), and refusing what the CPU lacks or does not exist with a message
 * instead of a SIGILL. */
static void test_isa_resolve(void **state)
{
	enum moe_cpu_isa isa;
	char err[256];

	assert_int_equal(moe_cpu_isa_resolve(NULL, NULL, &isa, err, sizeof(err)), 0);
	assert_int_equal(isa, moe_cpu_isa_best());
	assert_int_equal(moe_cpu_isa_resolve("scalar", NULL, &isa, err, sizeof(err)), 0);
	assert_int_equal(isa, MOE_ISA_SCALAR);
	assert_int_equal(moe_cpu_isa_resolve("sse9", NULL, &isa, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "cpu.isa=sse9: unknown"));
	for (int i = 0; i < MOE_ISA_COUNT; i++) {
		int ret = moe_cpu_isa_resolve(moe_cpu_isa_name((enum moe_cpu_isa)i), NULL, &isa,
					      err, sizeof(err));

		if (moe_cpu_isa_supported((enum moe_cpu_isa)i)) {
			assert_int_equal(ret, 0);
		} else {
			assert_int_equal(ret, -ENOTSUP);
			assert_non_null(strstr(err, "does not support"));
		}
	}
	assert_int_equal(moe_cpu_isa_resolve("nope", "MOE_CPU_ISA", &isa, err, sizeof(err)),
			 -EINVAL);
	assert_non_null(strstr(err, "MOE_CPU_ISA=nope"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_bf16_decode_and_round),
		cmocka_unit_test(test_f16_decode_and_round),
		cmocka_unit_test(test_matmul),
		cmocka_unit_test(test_swiglu),
		cmocka_unit_test(test_route_softmax),
		cmocka_unit_test(test_route_groups),
		cmocka_unit_test(test_panels),
		cmocka_unit_test(test_pairs),
		cmocka_unit_test(test_isa_resolve),
	};

	return cmocka_run_group_tests_name("kernels", tests, NULL, NULL);
}
