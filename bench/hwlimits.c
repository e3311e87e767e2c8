#include "bench/hwlimits.h"

#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "daemon/engine/threadpool.h"
#include "kernels/cpu/isa.h"

double moe_bench_now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

struct bw_ctx {
	const char *buf;
	size_t bytes, chunk;
	int streams;
	double sink[64];
};

/* The reads: `streams` interleaved sequential streams over p[0, n) (each
 * n / streams long), 64 bytes from each in turn. One stream is a plain
 * sweep; several are what a kernel reading a few weight rows at once
 * does, and on some machines (Zen 3 VMs: 18-21 GB/s with one stream a
 * core, 24-30 with four) only several reach the memory's rate. */
__attribute__((target("avx2"))) static double sum_avx2(const char *p, size_t n, int streams)
{
	__m256i a = _mm256_setzero_si256(), b = a;
	size_t len = n / (size_t)streams;

	for (size_t i = 0; i + 64 <= len; i += 64)
		for (int s = 0; s < streams; s++) {
			const char *q = p + (size_t)s * len + i;

			a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)q));
			b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i *)(q + 32)));
		}
	a = _mm256_xor_si256(a, b);
	return (double)_mm256_extract_epi64(a, 0);
}

__attribute__((target("avx512f"))) static double sum_avx512(const char *p, size_t n,
							      int streams)
{
	__m512i a = _mm512_setzero_si512(), b = a;
	size_t len = n / (size_t)streams;

	for (size_t i = 0; i + 128 <= len; i += 128)
		for (int s = 0; s < streams; s++) {
			const char *q = p + (size_t)s * len + i;

			a = _mm512_xor_si512(a, _mm512_load_si512((const void *)q));
			b = _mm512_xor_si512(b, _mm512_load_si512((const void *)(q + 64)));
		}
	a = _mm512_xor_si512(a, b);
	return (double)_mm_cvtsi128_si64(_mm512_castsi512_si128(a));
}

static double sum_scalar(const char *p, size_t n, int streams)
{
	uint64_t a = 0, b = 0;
	size_t len = n / (size_t)streams;

	for (size_t i = 0; i + 16 <= len; i += 16)
		for (int s = 0; s < streams; s++) {
			const uint64_t *q = (const uint64_t *)(p + (size_t)s * len + i);

			a ^= q[0];
			b ^= q[1];
		}
	return (double)(a ^ b);
}

static void bw_task(void *arg, uint32_t task, uint32_t worker)
{
	struct bw_ctx *c = arg;
	const char *p = c->buf + (size_t)task * c->chunk;
	size_t n = c->chunk;

	c->sink[worker & 63] += moe_cpu_isa_supported(MOE_ISA_AVX512) ? sum_avx512(p, n, c->streams)
				: moe_cpu_isa_supported(MOE_ISA_AVX2)	? sum_avx2(p, n, c->streams)
									: sum_scalar(p, n, c->streams);
}

/* The best of 4 sweeps each with 1 and with 4 streams per chunk: on a
 * shared machine a measurement can only come out low. The buffer is on
 * 2 MiB pages where the kernel gives them, as the engine's expert slots
 * are (backend_cpu.c): on 4 KiB pages the Zen 3 VM's probe read ~15 %
 * less than decode then streamed from its slots. */
double moe_bench_read_bw(struct moe_pool *pool, size_t bytes)
{
	struct bw_ctx c = {0};
	double best = 0;
	char *buf;

	c.chunk = 4 << 20;
	bytes = bytes / c.chunk * c.chunk;
	buf = aligned_alloc(2u << 20, bytes);
	if (!buf)
		return 0;
#ifdef MADV_HUGEPAGE
	madvise(buf, bytes, MADV_HUGEPAGE);
#endif
	memset(buf, 1, bytes); /* fault every page in before timing */
	c.buf = buf;
	c.bytes = bytes;
	for (int rep = 0; rep < 8; rep++) {
		double t0, bw;

		c.streams = rep % 2 ? 4 : 1;
		t0 = moe_bench_now();
		moe_pool_run(pool, (uint32_t)(bytes / c.chunk), bw_task, &c);
		bw = (double)bytes / (moe_bench_now() - t0);
		best = bw > best ? bw : best;
	}
	free(buf);
	return best;
}

#define FMA_ITERS 20000000u

struct fma_ctx {
	int isa;
	double sink[64];
};

/* 12 independent FMA chains: more than latency x throughput (4 x 2) so the
 * FMA units never wait. Named registers, not an array, so nothing is
 * stored back to memory in the loop. */
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

__attribute__((target("avx2,fma"))) static double fma_avx2(void)
{
	__m256 x = _mm256_set1_ps(1.0000001f), y = _mm256_set1_ps(0.9999999f);
#define INIT(i) __m256 a##i = _mm256_set1_ps((float)i);
#define FMA(i) a##i = _mm256_fmadd_ps(a##i, x, y);
#define SUM(i) s = _mm256_add_ps(s, a##i);
	CHAINS(INIT)
	__m256 s = _mm256_setzero_ps();

	for (uint32_t it = 0; it < FMA_ITERS; it++) {
		CHAINS(FMA)
	}
	CHAINS(SUM)
	return _mm256_cvtss_f32(s);
#undef INIT
#undef FMA
#undef SUM
}

__attribute__((target("avx512f"))) static double fma_avx512(void)
{
	__m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
#define INIT(i) __m512 a##i = _mm512_set1_ps((float)i);
#define FMA(i) a##i = _mm512_fmadd_ps(a##i, x, y);
#define SUM(i) s = _mm512_add_ps(s, a##i);
	CHAINS(INIT)
	__m512 s = _mm512_setzero_ps();

	for (uint32_t it = 0; it < FMA_ITERS; it++) {
		CHAINS(FMA)
	}
	CHAINS(SUM)
	return _mm512_reduce_add_ps(s);
#undef INIT
#undef FMA
#undef SUM
}

__attribute__((target("avx512f,avx512bf16"))) static double dp_bf16(void)
{
	__m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = x;
#define INIT(i) __m512 a##i = _mm512_set1_ps((float)i);
#define FMA(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
#define SUM(i) s = _mm512_add_ps(s, a##i);
	CHAINS(INIT)
	__m512 s = _mm512_setzero_ps();

	for (uint32_t it = 0; it < FMA_ITERS; it++) {
		CHAINS(FMA)
	}
	CHAINS(SUM)
	return _mm512_reduce_add_ps(s);
#undef INIT
#undef FMA
#undef SUM
}

/* AMX: tdpbf16ps on tiles kept in registers (the physical limit): four
 * 16x16 fp32 accumulators (tmm0-3), two A tiles (16 rows of 32 bf16, tmm4-5)
 * and two B tiles (16 rows of 16 bf16 pairs, tmm6-7); each instruction does
 * 16 x 16 x 32 multiply-adds. The tile configuration is per thread. */
#define AMX_ITERS 2000000u

struct amx_cfg {
	uint8_t palette, start_row, reserved[14];
	uint16_t colsb[16];
	uint8_t rows[16];
};

__attribute__((target("amx-tile,amx-bf16"))) static double dp_amx(void)
{
	struct amx_cfg cfg = {.palette = 1};
	static const uint16_t one[16 * 32] __attribute__((aligned(64))) = {0};
	float out[16 * 16] __attribute__((aligned(64)));

	for (int t = 0; t < 8; t++) {
		cfg.rows[t] = 16;
		cfg.colsb[t] = 64;
	}
	_tile_loadconfig(&cfg);
	_tile_zero(0);
	_tile_zero(1);
	_tile_zero(2);
	_tile_zero(3);
	_tile_loadd(4, one, 64);
	_tile_loadd(5, one, 64);
	_tile_loadd(6, one, 64);
	_tile_loadd(7, one, 64);
	for (uint32_t it = 0; it < AMX_ITERS; it++) {
		_tile_dpbf16ps(0, 4, 6);
		_tile_dpbf16ps(1, 4, 7);
		_tile_dpbf16ps(2, 5, 6);
		_tile_dpbf16ps(3, 5, 7);
	}
	_tile_stored(0, out, 64);
	_tile_release();
	return out[0];
}

static void fma_task(void *arg, uint32_t task, uint32_t worker)
{
	struct fma_ctx *c = arg;

	c->sink[worker & 63] += c->isa == 4	? dp_amx()
				: c->isa == 3	? dp_bf16()
				: c->isa == 2 ? fma_avx512()
						  : fma_avx2();
}

/* Best of 5 runs: a shared machine only ever makes a run slower. */
static double run_peak(struct moe_pool *pool, int isa, double flop_per_op_lane, int lanes)
{
	struct fma_ctx c = {.isa = isa};
	uint32_t n = moe_pool_threads(pool);
	double best = 0;

	for (int rep = 0; rep < 5; rep++) {
		double t0 = moe_bench_now(), r;

		moe_pool_run(pool, n, fma_task, &c);
		r = isa == 4 ? (double)n * AMX_ITERS * 4 * flop_per_op_lane / (moe_bench_now() - t0)
			     : (double)n * FMA_ITERS * 12 * lanes * flop_per_op_lane /
				       (moe_bench_now() - t0);
		best = r > best ? r : best;
	}
	return best;
}

double moe_bench_fma_peak(struct moe_pool *pool, int isa, const char **what)
{
	if (isa >= 2 && moe_cpu_isa_supported(MOE_ISA_AVX512)) {
		*what = "fp32 FMA (vfmadd, zmm)";
		return run_peak(pool, 2, 2, 16);
	}
	if (isa >= 1 && moe_cpu_isa_supported(MOE_ISA_AVX2)) {
		*what = "fp32 FMA (vfmadd, ymm)";
		return run_peak(pool, 1, 2, 8);
	}
	*what = "none (scalar path: no vector FMA measured)";
	return 0;
}

double moe_bench_amx_peak(struct moe_pool *pool, char *why, size_t n)
{
	if (moe_cpu_amx_enable(why, n))
		return 0;
	/* one tdpbf16ps: 16 x 16 x 32 multiply-adds = 16384 FLOP */
	return run_peak(pool, 4, 16384, 1);
}

uint64_t moe_bench_llc_bytes(void)
{
	uint64_t best = 0;

	/* the largest cache level cpu0 reports (sysfs: "32768K") */
	for (int i = 0; i < 8; i++) {
		char path[96], buf[32], unit = 0;
		unsigned long long v = 0;
		FILE *f;

		snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(buf, sizeof(buf), f) && sscanf(buf, "%llu%c", &v, &unit) >= 1) {
			v *= unit == 'K' ? 1024ull : unit == 'M' ? 1ull << 20 : 1;
			best = v > best ? v : best;
		}
		fclose(f);
	}
	return best;
}

double moe_bench_bf16_peak(struct moe_pool *pool)
{
	if (!moe_cpu_has_avx512_bf16())
		return 0;
	/* each vdpbf16ps lane does 2 multiply-adds = 4 FLOP */
	return run_peak(pool, 3, 4, 16);
}

int moe_bench_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}
