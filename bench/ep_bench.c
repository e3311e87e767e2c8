/* moe-bench ep — a rebalance while serving, measured in one run.
 *
 * In-process (the engine without the daemon, so that the figures are the
 * engine's and the copy's, not the socket's): one client thread sends
 * forwards of 1..max-tokens tokens (random layers, bf16, a fixed seed),
 * one at a time, on R CPU ranks with spare slots:
 *   1. before: N requests: throughput, p50/p99 latency, the ranks' rows
 *      (max/mean, worst layer);
 *   2. plan: from the experts' load over phase 1 (the planner, keep mode):
 *      replicas to copy, bytes, predicted max/mean;
 *   3. during: the move runs on its own thread, its copies paced so that at
 *      least --overlap requests run while it copies; p99 of the requests
 *      that ran entirely during it; its duration and bytes;
 *   4. after: N requests on the new placement: throughput, p99, max/mean.
 * Run it on a model with a skewed router (moe-mkmodel --skew or --zipf).
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/hwlimits.h"
#include "daemon/engine/engine.h"
#include "daemon/engine/migrate.h"
#include "daemon/engine/rebalance.h"
#include "daemon/engine/stats.h"
#include "kernels/dtype.h"
#include "tools/synth.h"

int moe_bench_ep(int argc, char **argv);

static double pct(double *v, int n, double p)
{
	if (!n)
		return 0;
	qsort(v, (size_t)n, sizeof(double), moe_bench_cmp_double);
	return v[(int)((n - 1) * p)];
}

struct load {
	struct moe_engine *e;
	const struct moe_model *m;
	uint16_t *in, *out;
	uint32_t max_tokens;
	struct moe_rng rng;
	uint64_t tokens;
};

/* One request: a random layer and size. Returns its latency in s. */
static double one(struct load *L)
{
	uint32_t n = 1 + (uint32_t)(moe_rng_next(&L->rng) % L->max_tokens);
	uint32_t layer = L->m->layers[moe_rng_next(&L->rng) % L->m->n_moe_layers].index;
	size_t off = (size_t)(moe_rng_next(&L->rng) % 8) * L->max_tokens * L->m->hidden;
	struct moe_epoch *ep;
	struct moe_batch b = {layer, n, MOE_DT_BF16, L->in + off, L->out, NULL, NULL, 0, NULL, NULL};
	char err[MOE_ERRLEN];
	double t0 = moe_bench_now();

	ep = moe_epoch_acquire(L->e);
	if (moe_engine_forward(L->e, ep, &b, err)) {
		fprintf(stderr, "moe-bench ep: %s\n", err);
		exit(1);
	}
	moe_epoch_release(ep);
	L->tokens += n;
	return moe_bench_now() - t0;
}

/* The ranks' rows since `base` (per layer and rank), max/mean of the worst
 * layer; base is updated to now. */
static double measured(struct load *L, uint64_t *base)
{
	const struct moe_stats *st = moe_engine_stats(L->e);
	uint32_t R = moe_engine_ranks(L->e);
	double worst = 0;

	for (uint32_t l = 0; l < L->m->n_moe_layers; l++) {
		double sum = 0, max = 0;

		for (uint32_t r = 0; r < R; r++) {
			uint64_t v = moe_stats_rank_rows(st, l, r, 0, 0);
			double d = (double)(v - base[l * R + r]);

			base[l * R + r] = v;
			sum += d;
			max = d > max ? d : max;
		}
		if (sum > 0 && max / (sum / R) > worst)
			worst = max / (sum / R);
	}
	return worst;
}

struct phase {
	int n;
	double secs, p50, p99, tokens;
};

static struct phase run_phase(struct load *L, int n, double *lat)
{
	struct phase p = {n, 0, 0, 0, 0};
	uint64_t tok0 = L->tokens;
	double t0 = moe_bench_now();

	for (int i = 0; i < n; i++)
		lat[i] = one(L);
	p.secs = moe_bench_now() - t0;
	p.tokens = (double)(L->tokens - tok0);
	p.p50 = pct(lat, n, 0.50);
	p.p99 = pct(lat, n, 0.99);
	return p;
}

struct mover {
	struct moe_engine *e;
	const uint64_t *want;
	struct moe_migrate_opts o;
	struct moe_migrate_result res;
	atomic_bool done;
	double secs;
	int ret;
	char err[MOE_ERRLEN];
};

static void *move_main(void *arg)
{
	struct mover *mv = arg;
	double t0 = moe_bench_now();

	mv->ret = moe_engine_migrate(mv->e, mv->want, &mv->o, &mv->res, mv->err);
	mv->secs = moe_bench_now() - t0;
	atomic_store(&mv->done, true);
	return NULL;
}

/* The target: per layer, the planner's (keep mode) from the experts' load
 * since start; *copies gets the replicas it adds on ranks, *pred the worst
 * predicted max/mean before and after. */
static uint64_t *plan(struct load *L, uint32_t *copies, double pred[2])
{
	const struct moe_model *m = L->m;
	uint32_t E = m->n_experts, R = moe_engine_ranks(L->e), S = moe_engine_slots_per_rank(L->e);
	uint32_t P = (E + R - 1) / R;
	uint64_t *want = calloc((size_t)m->n_moe_layers * E, sizeof(*want));
	double *load = malloc(sizeof(double) * E);
	uint8_t cn[256], nn[256];
	struct moe_replica cr[256 * MOE_MAX_REPLICAS], nr[256 * MOE_MAX_REPLICAS];
	struct moe_epoch *ep = moe_epoch_acquire(L->e);

	*copies = 0;
	pred[0] = pred[1] = 0;
	for (uint32_t l = 0; l < m->n_moe_layers && E <= 256; l++) {
		struct moe_load_in in = {E, R, S > P ? S - 1 : S, load};
		double b, a;

		for (uint32_t x = 0; x < E; x++) {
			uint32_t n;
			const struct moe_replica *r = moe_place_get(ep->placement, l, x, &n);

			load[x] = (double)moe_engine_expert_tokens(L->e, l, x);
			cn[x] = (uint8_t)n;
			memcpy(&cr[x * MOE_MAX_REPLICAS], r, sizeof(*r) * MOE_MAX_REPLICAS);
		}
		if (moe_plan_layer(&in, MOE_PLAN_KEEP, cn, cr, nn, nr)) {
			fprintf(stderr, "moe-bench ep: the planner failed on layer %u\n", l);
			exit(1);
		}
		b = moe_plan_max_mean(&in, cn, cr);
		a = moe_plan_max_mean(&in, nn, nr);
		pred[0] = b > pred[0] ? b : pred[0];
		pred[1] = a > pred[1] ? a : pred[1];
		for (uint32_t x = 0; x < E; x++) {
			uint64_t before = 0, mask = 0;

			for (uint32_t i = 0; i < cn[x]; i++)
				before |= 1ull << cr[x * MOE_MAX_REPLICAS + i].rank;
			for (uint32_t i = 0; i < nn[x]; i++)
				mask |= 1ull << nr[x * MOE_MAX_REPLICAS + i].rank;
			*copies += (uint32_t)__builtin_popcountll(mask & ~before);
			want[(size_t)l * E + x] = mask;
		}
	}
	moe_epoch_release(ep);
	free(load);
	return want;
}

int moe_bench_ep(int argc, char **argv)
{
	static const struct option opts[] = {
		{"model", 1, NULL, 'm'},   {"ranks", 1, NULL, 'r'},    {"spare", 1, NULL, 's'},
		{"requests", 1, NULL, 'n'}, {"max-tokens", 1, NULL, 't'}, {"overlap", 1, NULL, 'o'},
		{"threads", 1, NULL, 'T'},  {"help", 0, NULL, 'h'},	    {0},
	};
	const char *model = NULL;
	uint32_t R = 2, spare = 2, threads = 0, max_tokens = 64;
	int N = 2000, overlap = 1000, c, nd = 0;
	struct moe_engine_opts eo = {0};
	struct moe_model *m;
	struct load L = {0};
	struct mover mv = {0};
	struct phase before, after;
	double *lat, *during, pred[2], mbefore, mduring, mafter, rate, target_s;
	uint64_t *base;
	uint32_t copies;
	pthread_t th;
	char err[MOE_ERRLEN];

	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'm': model = optarg; break;
		case 'r': R = (uint32_t)strtoul(optarg, NULL, 10); break;
		case 's': spare = (uint32_t)strtoul(optarg, NULL, 10); break;
		case 'n': N = atoi(optarg); break;
		case 't': max_tokens = (uint32_t)strtoul(optarg, NULL, 10); break;
		case 'o': overlap = atoi(optarg); break;
		case 'T': threads = (uint32_t)strtoul(optarg, NULL, 10); break;
		default:
			fprintf(c == 'h' ? stdout : stderr,
				"usage: moe-bench ep --model DIR [--ranks R (2)] [--spare S (2)] "
				"[--requests N (2000)] [--max-tokens T (64)] [--overlap K (1000)] "
				"[--threads N]\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (!model || R < 2 || N < 100 || overlap < 1 || !max_tokens) {
		fprintf(stderr, "moe-bench ep: --model DIR needed; --ranks >= 2, --requests >= 100\n");
		return 2;
	}
	moe_engine_opts_from_env(&eo);
	eo.n_ranks = R, eo.spare_slots = spare, eo.threads = threads;
	eo.max_batch_tokens = max_tokens, eo.stats_window_ms = 3600 * 1000;
	if (moe_model_open(model, NULL, &m, err) || moe_engine_create(m, &eo, &L.e, err)) {
		fprintf(stderr, "moe-bench ep: %s\n", err);
		return 1;
	}
	L.m = m, L.max_tokens = max_tokens, L.rng = (struct moe_rng){1234};
	L.in = malloc(sizeof(uint16_t) * 8 * max_tokens * m->hidden);
	L.out = malloc(sizeof(uint16_t) * max_tokens * m->hidden);
	lat = malloc(sizeof(double) * (size_t)(N > 100000 ? N : 100000));
	during = malloc(sizeof(double) * 1000000);
	base = calloc((size_t)m->n_moe_layers * R, sizeof(*base));
	for (size_t i = 0; i < (size_t)8 * max_tokens * m->hidden; i++)
		L.in[i] = moe_f32_to_bf16((float)moe_rng_normal(&L.rng));
	printf("moe-bench ep: %s, %u experts top-%u, hidden %u, %u MoE layers; %u CPU ranks, %u "
	       "spare slots, %u threads; requests of 1-%u tokens, one at a time\n",
	       moe_family_name(m->family), m->n_experts, m->top_k, m->hidden, m->n_moe_layers, R,
	       spare, moe_engine_threads(L.e), max_tokens);
	for (int i = 0; i < 50; i++) /* warm-up */
		one(&L);
	measured(&L, base);
	before = run_phase(&L, N, lat);
	mbefore = measured(&L, base);
	{
		/* the experts' load of layer 0, most popular first, and the
		 * coefficient of variation (a trained router's is 0.5-1.5) */
		uint32_t E = m->n_experts;
		double *t = malloc(sizeof(double) * E), sum = 0, sq = 0;

		for (uint32_t x = 0; x < E; x++) {
			t[x] = (double)moe_engine_expert_tokens(L.e, 0, x);
			sum += t[x];
			sq += t[x] * t[x];
		}
		qsort(t, E, sizeof(double), moe_bench_cmp_double);
		printf("expert load, layer 0 (share of its tokens, most popular first):");
		for (uint32_t i = 0; i < 6 && i < E; i++)
			printf(" %.3f", t[E - 1 - i] / sum);
		printf(" ... %.4f; CV %.2f\n", t[0] / sum,
		       sqrt(sq / E - (sum / E) * (sum / E)) / (sum / E));
		free(t);
	}
	mv.want = plan(&L, &copies, pred);
	rate = N / before.secs;
	/* pace the copies so that `overlap` requests fit in the move, with a
	 * margin: bytes / (overlap / rate * 1.5) */
	target_s = overlap / rate * 1.5;
	mv.e = L.e;
	mv.o.bytes_per_s = (uint64_t)((double)copies * (double)m->expert_bytes / target_s);
	if (!mv.o.bytes_per_s)
		mv.o.bytes_per_s = 1;
	printf("\nplan (from the load of phase 1): %u replicas to copy (%.1f MiB), predicted "
	       "max/mean %.3f -> %.3f; copies paced at %.1f MiB/s\n", copies,
	       (double)copies * (double)m->expert_bytes / (1 << 20), pred[0], pred[1],
	       (double)mv.o.bytes_per_s / (1 << 20));
	atomic_init(&mv.done, false);
	if (pthread_create(&th, NULL, move_main, &mv))
		return 1;
	while (!atomic_load(&mv.done) && nd < 1000000) {
		double t = one(&L);

		if (!atomic_load(&mv.done))
			during[nd++] = t;
	}
	pthread_join(th, NULL);
	if (mv.ret) {
		fprintf(stderr, "moe-bench ep: the move failed: %s\n", mv.err);
		return 1;
	}
	mduring = measured(&L, base);
	after = run_phase(&L, N, lat);
	mafter = measured(&L, base);
	printf("\n%-8s %9s %9s %10s %10s %13s\n", "phase", "requests", "req/s", "p50 ms", "p99 ms",
	       "rank max/mean");
	printf("%-8s %9d %9.0f %10.3f %10.3f %13.3f\n", "before", before.n, before.n / before.secs,
	       before.p50 * 1e3, before.p99 * 1e3, mbefore);
	{
		double p50 = pct(during, nd, 0.5), p99 = pct(during, nd, 0.99);

		printf("%-8s %9d %9.0f %10.3f %10.3f %13.3f\n", "during", nd, nd / mv.secs, p50 * 1e3,
		       p99 * 1e3, mduring);
		printf("%-8s %9d %9.0f %10.3f %10.3f %13.3f\n", "after", after.n, after.n / after.secs,
		       after.p50 * 1e3, after.p99 * 1e3, mafter);
		printf("\nthe move: %.2f s, %u replicas copied (%.1f MiB), %u dropped, %u placements "
		       "published; p99 during / before = %.2f; throughput after / before = %.2f; "
		       "predicted max/mean after %.3f, measured %.3f\n", mv.secs, mv.res.added,
		       (double)mv.res.bytes / (1 << 20), mv.res.dropped, mv.res.publishes,
		       p99 / before.p99, (after.n / after.secs) / (before.n / before.secs), pred[1],
		       mafter);
		if (nd < overlap)
			printf("(only %d requests overlapped the move: raise --overlap)\n", nd);
	}
	moe_engine_destroy(L.e);
	moe_model_free(m);
	free((void *)mv.want), free(L.in), free(L.out), free(lat), free(during), free(base);
	return 0;
}
