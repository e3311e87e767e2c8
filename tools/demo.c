/* moe-demo — runs the engine in-process on a checkpoint and reports what it
 * did: a decode-like phase (small batches) and a prefill-like phase (large
 * batches) over every MoE layer, with tokens/s and the expert load balance.
 * (With the daemon, the README's main job drives moed through clients.) */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "kernels/cpu/convert.h"
#include "tools/synth.h"

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Runs `iters` batches of `n` tokens on every MoE layer; returns seconds. */
static double phase(struct moe_engine *e, uint32_t n, uint32_t iters, uint16_t *in, uint16_t *out)
{
	const struct moe_model *m = moe_engine_model(e);
	char err[MOE_ERRLEN];
	double t0 = now();

	for (uint32_t it = 0; it < iters; it++) {
		for (uint32_t l = 0; l < m->n_moe_layers; l++) {
			struct moe_epoch *ep = moe_epoch_acquire(e);
			struct moe_batch b = {
				.layer = m->layers[l].index,
				.n_tokens = n,
				.dtype = MOE_DT_BF16,
				.in = in + (size_t)((it * 7 + l) % 16) * m->hidden,
				.out = out,
			};

			if (moe_engine_forward(e, ep, &b, err)) {
				fprintf(stderr, "moe-demo: %s\n", err);
				exit(1);
			}
			moe_epoch_release(ep);
		}
	}
	return now() - t0;
}

int main(int argc, char **argv)
{
	struct moe_engine_opts eo = {.max_batch_tokens = 256};
	struct moe_model *m;
	struct moe_engine *e;
	struct moe_rng r = {42};
	char err[MOE_ERRLEN];
	uint16_t *in, *out;
	double t0, s;
	int c;

	while ((c = getopt(argc, argv, "t:")) != -1) {
		if (c == 't')
			eo.threads = (uint32_t)atoi(optarg);
		else
			return 2;
	}
	if (optind != argc - 1) {
		fprintf(stderr, "usage: moe-demo [-t THREADS] CHECKPOINT_DIR\n");
		return 2;
	}
	t0 = now();
	if (moe_model_open(argv[optind], NULL, &m, err) || moe_engine_create(m, &eo, &e, err)) {
		fprintf(stderr, "moe-demo: %s\n", err);
		return 1;
	}
	s = now() - t0;
	printf("loaded %s: %s, %u MoE layers, %u experts top-%u, hidden %u, %s\n", argv[optind],
	       moe_family_name(m->family), m->n_moe_layers, m->n_experts, m->top_k, m->hidden,
	       moe_dtype_name(m->dtype));
	printf("  %.1f MiB of weights read in %.2f s, backend %s, %u threads\n",
	       (double)moe_engine_weight_bytes(e) / (1 << 20), s, moe_engine_backend(e),
	       moe_engine_threads(e));

	in = malloc((size_t)(256 + 16) * m->hidden * sizeof(uint16_t));
	out = malloc((size_t)256 * m->hidden * sizeof(uint16_t));
	for (size_t i = 0; i < (size_t)(256 + 16) * m->hidden; i++)
		in[i] = moe_f32_to_bf16((float)moe_rng_normal(&r));

	struct {
		const char *name;
		uint32_t n, iters;
	} ph[] = {{"decode  (1 token/batch)", 1, 40},
		  {"decode  (8 tokens/batch)", 8, 20},
		  {"prefill (256 tokens/batch)", 256, 3}};
	for (size_t i = 0; i < sizeof(ph) / sizeof(ph[0]); i++) {
		double t = phase(e, ph[i].n, ph[i].iters, in, out);
		double tok = (double)ph[i].n * ph[i].iters;

		printf("  %-28s %8.0f tokens/s through all %u MoE layers (%.2f ms per layer call)\n",
		       ph[i].name, tok / t, m->n_moe_layers,
		       1e3 * t / (ph[i].iters * m->n_moe_layers));
	}

	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		uint64_t mx = 0, sum = 0;

		for (uint32_t x = 0; x < m->n_experts; x++) {
			uint64_t v = moe_engine_expert_tokens(e, l, x);

			sum += v;
			mx = v > mx ? v : mx;
		}
		printf("  layer %u: %llu token-expert assignments, load max/mean %.2f\n",
		       m->layers[l].index, (unsigned long long)sum,
		       sum ? (double)mx * m->n_experts / (double)sum : 0.0);
	}
	free(in);
	free(out);
	moe_engine_destroy(e);
	moe_model_free(m);
	return 0;
}
