/* moe-bench panels — one fp32-activation panel kernel (panel.h) by tile
 * height: for m = 1..12 tokens, the gate/up kernel over 1 GiB of packed
 * bf16 panels (cold: every byte from memory) and over a few hundred KiB
 * per thread (hot: from cache), every pool thread taking chunks of 4
 * panels as the engine's tasks do, against the read bandwidth measured in
 * the same run.
 *
 * Decode at 16 tokens mixes experts of 1 to 6 rows: this table says which
 * heights stream at the memory's rate and which are held back by their
 * arithmetic (hot below cold's rate: the core cannot consume the bytes
 * faster) or by the few streams they read (hot well above cold).
 *
 * The heights are measured in rounds, each round every m once, and each
 * figure is the median over the rounds: this way a shared machine's
 * bandwidth swings spread over all heights instead of landing on one. */
#include <errno.h>
#include <getopt.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bench/hwlimits.h"
#include "daemon/engine/threadpool.h"
#include "kernels/cpu/isa.h"
#include "kernels/cpu/panel.h"
#include "tools/synth.h"

int moe_bench_panels(int argc, char **argv);

#define SWEEP_M	    12
#define CHUNK_PANELS 4

struct sweep {
	const struct moe_cpu_kernels *kn;
	const char *buf;
	size_t chunk, n_chunks; /* chunks in the buffer */
	uint32_t k, m, reps;	/* tasks: n_chunks * reps, chunk = task % n_chunks */
	const float *x;
	float *h; /* per worker: SWEEP_M x CHUNK_PANELS * 8 */
};

static void sweep_task(void *arg, uint32_t task, uint32_t worker)
{
	struct sweep *s = arg;
	size_t c = task % s->n_chunks;

	s->kn->gate_up(s->x, s->k, s->m, s->buf + c * s->chunk, MOE_DT_BF16, s->k,
		       CHUNK_PANELS * 8, s->h + (size_t)worker * SWEEP_M * CHUNK_PANELS * 8,
		       CHUNK_PANELS * 8);
}

/* GB/s of one pass: n_chunks * reps chunks. */
static double pass(struct moe_pool *pool, struct sweep *s)
{
	double t0 = moe_bench_now(), t;

	moe_pool_run(pool, (uint32_t)(s->n_chunks * s->reps), sweep_task, s);
	t = moe_bench_now() - t0;
	return (double)s->chunk * s->n_chunks * s->reps / t / 1e9;
}

int moe_bench_panels(int argc, char **argv)
{
	static const struct option opts[] = {
		{"threads", 1, NULL, 't'}, {"isa", 1, NULL, 'i'}, {"rounds", 1, NULL, 'r'},
		{"k", 1, NULL, 'k'},	   {"help", 0, NULL, 'h'}, {0},
	};
	uint32_t threads = 0, rounds = 5, k = 2048;
	const char *isa_req = NULL;
	enum moe_cpu_isa isa;
	char err[256];
	struct moe_pool *pool;
	struct moe_rng r = {7};
	size_t cold_bytes = (size_t)1 << 30, hot_per_thread = 192 << 10;
	double cold[SWEEP_M + 1][32], hot[SWEEP_M + 1][32], bw;
	struct sweep s = {0};
	char *buf;
	float *x;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 't':
			threads = (uint32_t)atoi(optarg);
			break;
		case 'i':
			isa_req = optarg;
			break;
		case 'r':
			rounds = (uint32_t)atoi(optarg);
			break;
		case 'k':
			k = (uint32_t)atoi(optarg);
			break;
		default:
			fprintf(c == 'h' ? stdout : stderr,
				"usage: moe-bench panels [--threads N] [--isa auto|scalar|avx2|avx512]"
				" [--rounds R] [--k K]\n"
				"The fp32-activation panel kernel on bf16 weights, by tile height\n"
				"(1-12 tokens): GB/s over 1 GiB of cold panels and over panels in\n"
				"cache, beside the read bandwidth; medians over R rounds (default 5).\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (!rounds || rounds > 32 || k < 16 || k > 65536) {
		fprintf(stderr, "moe-bench panels: --rounds 1..32, --k 16..65536\n");
		return 2;
	}
	if (moe_cpu_isa_resolve(isa_req, "--isa", &isa, err, sizeof(err))) {
		fprintf(stderr, "moe-bench panels: %s\n", err);
		return 2;
	}
	if (moe_cpu_isa_bf16(isa)) /* their fp32 kernels are avx512's */
		isa = MOE_ISA_AVX512;
	if (moe_pool_create(threads, &pool)) {
		fprintf(stderr, "moe-bench panels: cannot start the threads\n");
		return 1;
	}
	threads = moe_pool_threads(pool);
	s.kn = moe_cpu_kernels_for(isa);
	s.k = k;
	s.chunk = moe_pack_gate_up_bytes(CHUNK_PANELS * 8, k, MOE_DT_BF16);
	s.n_chunks = cold_bytes / s.chunk;
	buf = aligned_alloc(2u << 20, s.n_chunks * s.chunk);
	x = malloc((size_t)SWEEP_M * k * sizeof(float));
	s.h = malloc((size_t)threads * SWEEP_M * CHUNK_PANELS * 8 * sizeof(float));
	if (!buf || !x || !s.h) {
		fprintf(stderr, "moe-bench panels: out of memory\n");
		return 1;
	}
#ifdef MADV_HUGEPAGE
	madvise(buf, s.n_chunks * s.chunk, MADV_HUGEPAGE); /* as the engine's slots */
#endif
	/* random finite bf16 weights (|w| in [2^-8, 2)), random activations */
	for (size_t i = 0; i < s.n_chunks * s.chunk / 2; i++)
		((uint16_t *)buf)[i] =
			(uint16_t)(0x3b80 + (moe_rng_next(&r) & 0x3ff) + (i & 1 ? 0x8000 : 0));
	for (size_t i = 0; i < (size_t)SWEEP_M * k; i++)
		x[i] = (float)moe_rng_uniform(&r) - 0.5f;
	s.buf = buf;
	s.x = x;
	bw = moe_bench_read_bw(pool, (size_t)1 << 30);

	for (uint32_t rd = 0; rd < rounds; rd++) {
		for (uint32_t m = 1; m <= SWEEP_M; m++) {
			struct sweep hs = s;

			s.m = m;
			s.reps = 1;
			cold[m][rd] = pass(pool, &s);
			/* hot: each thread's share of a few chunks, read many times */
			hs.m = m;
			hs.n_chunks = (hot_per_thread * threads + s.chunk - 1) / s.chunk;
			hs.reps = (uint32_t)((256u << 20) / (hs.n_chunks * s.chunk)) + 1;
			pass(pool, &hs); /* (into cache) */
			hot[m][rd] = pass(pool, &hs);
		}
	}
	printf("moe-bench panels: %s gate/up kernel, bf16 weights, K %u, %u threads, "
	       "chunks of %u panels (%zu KiB)\n",
	       moe_cpu_isa_name(isa), k, threads, CHUNK_PANELS, s.chunk >> 10);
	printf("read bandwidth %.1f GB/s (best of the probe's passes); medians of %u rounds\n",
	       bw / 1e9, rounds);
	printf(" tokens  cold GB/s   %%bw   hot GB/s  cold GFLOP/s\n");
	for (uint32_t m = 1; m <= SWEEP_M; m++) {
		double cm, hm;

		qsort(cold[m], rounds, sizeof(double), moe_bench_cmp_double);
		qsort(hot[m], rounds, sizeof(double), moe_bench_cmp_double);
		cm = cold[m][rounds / 2];
		hm = hot[m][rounds / 2];
		/* 2 FLOP per weight (2 bytes) per token */
		printf(" %6u %10.1f %5.0f%% %10.1f %13.1f\n", m, cm, bw > 0 ? 100 * cm * 1e9 / bw : 0,
		       hm, cm * m);
	}
	free(buf);
	free(x);
	free(s.h);
	moe_pool_destroy(pool);
	return 0;
}
