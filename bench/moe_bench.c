/* moe-bench — one MoE layer in-process, against the hardware limits
 * measured in the same run.
 *
 * For each token count it prints the median time per call, the weight-read
 * bandwidth achieved (bytes of the distinct experts the batch touched, the
 * router's and the shared expert's, over the time) next to the machine's
 * read bandwidth, and the FLOP/s achieved (router, routed and shared
 * experts) next to the multiply-add peak. Default layer: shaped like OLMoE-1B-7B's
 * (hidden 2048, intermediate 1024, 64 experts, top-8, bf16), synthetic,
 * written once into a cache directory.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench/hwlimits.h"
#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "daemon/engine/threadpool.h"
#include "kernels/cpu/isa.h"
#include "tools/synth.h"

static void usage(FILE *f)
{
	fprintf(f, "usage: moe-bench ipc [--socket PATH | --model DIR]   (round trips through moed)\n"
		   "       moe-bench panels [--threads N] [--isa ISA]   (the panel kernel by tile height)\n"
		   "       moe-bench [--model DIR] [--layer L] [--threads N] [--isa auto|scalar|avx2|avx512|avx512bf16|amx]\n"
		   "                 [--precision auto|bf16|fp32] [--warm]\n"
		   "                 [--tokens 1,4,16,64,256,1024,4096] [--min-time SECONDS]\n"
		   "                 [--devices cpu:R]   (R CPU ranks: the table for 1 rank, then R)\n"
		   "       moe-bench --device cuda[:N] [--shape mixtral|olmoe|all] [--model DIR]\n"
		   "                 [--tokens 1,16,64,256,1024,4096]   (the CUDA backend on GPU N)\n"
		   "Without --model: a synthetic OLMoE-1B-7B-shaped model (hidden 2048, inter 1024,\n"
		   "64 experts, top-8, bf16, 5 MoE layers), cached in $MOE_BENCH_CACHE or /tmp.\n"
		   "Calls rotate over the MoE layers (--layer: one layer) so that the weights\n"
		   "come from memory as in a real model; the 'reuse' column is the bytes of\n"
		   "experts read between two visits of a layer, over the last-level cache.\n"
		   "--warm: no buffer read between calls (the fixed cost of a call on a small\n"
		   "layer whose weights stay in cache).\n");
}

static const char *default_model(char *buf, size_t n)
{
	const char *cache = getenv("MOE_BENCH_CACHE");
	struct moe_synth_opts o;
	char err[MOE_ERRLEN], probe[4200];
	struct stat st;

	snprintf(buf, n, "%s/moe-bench-olmoe-2048x1024x64x8-bf16-5l", cache ? cache : "/tmp");
	snprintf(probe, sizeof(probe), "%s/model.safetensors", buf);
	if (stat(probe, &st) == 0)
		return buf;
	moe_synth_defaults(&o, MOE_FAM_OLMOE);
	/* 5 layers (4 GB): decode rotates over them, so that a layer's experts
	 * are evicted from the last-level cache between two visits */
	o.hidden = 2048, o.inter = 1024, o.experts = 64, o.top_k = 8, o.layers = 5;
	o.dtype = MOE_DT_BF16, o.seed = 2026;
	fprintf(stderr, "moe-bench: writing the synthetic layer to %s (once)\n", buf);
	if (moe_synth_write(buf, &o, err)) {
		fprintf(stderr, "moe-bench: %s\n", err);
		exit(1);
	}
	return buf;
}

#define MAX_BENCH_LAYERS 256

int moe_bench_ipc(int argc, char **argv);
int moe_bench_panels(int argc, char **argv);
int moe_bench_ep(int argc, char **argv);
int moe_bench_cuda(const char *shape, const char *model, const char *tokens, int device,
		   double min_reps);

/* Reads `bytes` of buf, one load per cache line (outside the timed calls). */
static void evict(const volatile char *buf, size_t bytes)
{
	unsigned sum = 0;

	for (size_t i = 0; i < bytes; i += 64)
		sum += (unsigned char)buf[i];
	(void)sum;
}

/* Where a call's time goes: the engine's stages, mean per call. */
static void print_stages(const uint64_t *stage_ns, int reps, double t_total)
{
	static const char *const nm[MOE_STAGE_COUNT] = {"convert", "router",  "dispatch", "exchange",
							"experts", "combine", "device"};
	double in_stages = 0;

	printf("        mean per call, us:");
	for (int k = 0; k < MOE_STAGE_COUNT; k++) {
		in_stages += (double)stage_ns[k];
		if (stage_ns[k])
			printf(" %s %.1f", nm[k], (double)stage_ns[k] / 1e3 / reps);
	}
	printf("; outside the stages %.1f (of %.1f)\n", (t_total * 1e9 - in_stages) / 1e3 / reps,
	       t_total * 1e6 / reps);
}

/* Bytes a call reads besides its routed experts: the router (packed in the
 * model's dtype, backend_cpu.c) and the shared expert, with its gate
 * (Qwen2-MoE), every call. */
static double call_fixed_bytes(const struct moe_model *m)
{
	double ds = (double)moe_dtype_size(m->dtype);

	return ds * m->n_experts * m->hidden + ds * 3.0 * m->shared_inter * m->hidden +
	       (m->family == MOE_FAM_QWEN2_MOE && m->shared_inter ? ds * m->hidden : 0.0);
}

/* Multiply-adds x 2 of n tokens: router, the K routed experts' FFNs, the
 * shared expert's and its gate. */
static double call_flops(const struct moe_model *m, uint32_t n)
{
	double H = m->hidden;

	return 2.0 * n * (m->top_k * 3.0 * m->inter * H + m->n_experts * H +
			  3.0 * m->shared_inter * H +
			  (m->family == MOE_FAM_QWEN2_MOE && m->shared_inter ? H : 0.0));
}

/* One table: median time per batch of each size on engine e, against the
 * machine's limits. The calls rotate over the nl layers (and NSETS inputs
 * per layer), so that between two visits of a layer the other layers'
 * experts have gone through the cache; where they are fewer than twice the
 * last-level cache, a buffer is read between the calls to make up the
 * difference. The reuse column: bytes read between two visits of a layer
 * (experts and buffer) over the last-level cache (>= 2: the weights come
 * from DRAM, as in a model with many layers). */
static int run_table(struct moe_engine *e, const struct moe_model *m, const uint32_t *layers,
		     uint32_t nl, const char *tokens, double min_time, double bw, double peak,
		     bool warm, struct moe_rng *rp)
{
	struct moe_rng r = *rp;
	char err[MOE_ERRLEN];
	double llc = warm ? 0 : (double)moe_bench_llc_bytes();
	size_t evict_cap = (size_t)(2 * llc);
	char *ebuf = evict_cap ? malloc(evict_cap) : NULL;

	if (ebuf)
		memset(ebuf, 1, evict_cap);

	printf("%7s %10s %8s %10s %6s %10s %6s %10s %7s %8s\n", "tokens", "median ms", "experts",
	       "GB/s", "%bw", "GFLOP/s", "%peak", "transport", "reuse", "bw GB/s");

	for (const char *p = tokens; *p;) {
		uint32_t n = (uint32_t)strtoul(p, (char **)&p, 10), K = m->top_k;
		/* NSETS different inputs per layer, cycled */
		enum { NSETS = 8 };
		uint32_t calls = nl * NSETS;
		uint16_t *in, *out;
		uint32_t *ids, *distinct;
		double *bws, *times, t_total = 0, avg_distinct = 0, flops, reuse = 0;
		size_t evict_bytes = 0;
		uint64_t tr0 = 0, stage_ns[MOE_STAGE_COUNT] = {0};
		int reps = 0, max_reps = 1000;

		if (*p == ',')
			p++;
		if (!n || n > moe_engine_max_tokens(e))
			continue;
		/* cold: the read bandwidth again just before the row, the
		 * better of it and the first (bw GB/s: what %bw is against) */
		if (!warm) {
			struct moe_pool *pool;

			if (!moe_pool_create(moe_engine_threads(e), &pool)) {
				double b = moe_bench_read_bw(pool, (size_t)1 << 30);

				bw = b > bw ? b : bw;
				moe_pool_destroy(pool);
			}
		}
		in = malloc((size_t)NSETS * n * m->hidden * 2);
		out = malloc((size_t)n * m->hidden * 2);
		ids = malloc((size_t)n * K * sizeof(uint32_t));
		distinct = calloc(calls, sizeof(uint32_t));
		times = malloc(max_reps * sizeof(double));
		bws = malloc(max_reps * sizeof(double));
		for (size_t i = 0; i < (size_t)NSETS * n * m->hidden; i++)
			in[i] = moe_f32_to_bf16((float)moe_rng_normal(&r));
		for (int rep = -(int)calls; rep < max_reps; rep++) {
			uint32_t call = (uint32_t)(rep + (int)calls) % calls;
			uint32_t layer = layers[call % nl], set = call / nl;
			struct moe_epoch *ep = moe_epoch_acquire(e);
			struct moe_stage_times st = {{0}};
			struct moe_batch b = {layer, n, MOE_DT_BF16,
					      in + (size_t)set * n * m->hidden, out,
					      rep < 0 ? ids : NULL, NULL, 0, NULL, &st};
			double t0, dt;

			if (rep == 0) { /* (the transport's time over the timed calls) */
				tr0 = moe_engine_transport_ns(e);
				/* bytes read between two visits of a layer: the other
				 * layers' calls, or the layer's own when it reads every
				 * expert; a buffer makes up twice the LLC */
				reuse = (avg_distinct * (double)m->expert_bytes + call_fixed_bytes(m)) *
					(nl > 1 ? nl - 1 : avg_distinct >= m->n_experts ? 1 : 0);
				if (ebuf && reuse < 2 * llc)
					evict_bytes = (size_t)((2 * llc - reuse) / nl);
				reuse += (double)evict_bytes * nl;
			}
			if (evict_bytes)
				evict(ebuf, evict_bytes);
			t0 = moe_bench_now();

			if (moe_engine_forward(e, ep, &b, err)) {
				fprintf(stderr, "moe-bench: %s\n", err);
				return 1;
			}
			dt = moe_bench_now() - t0;
			moe_epoch_release(ep);
			if (rep < 0) { /* warm-up: count the experts each call touches */
				unsigned char seen[MOE_MAX_EXPERTS] = {0};

				for (size_t i = 0; i < (size_t)n * K; i++)
					if (!seen[ids[i]]++)
						distinct[call]++;
				avg_distinct += (double)distinct[call] / calls;
				continue;
			}
			times[reps] = dt;
			for (int k = 0; k < MOE_STAGE_COUNT; k++)
				stage_ns[k] += st.ns[k];
			bws[reps++] = ((double)distinct[call] * (double)m->expert_bytes +
				       call_fixed_bytes(m)) / dt;
			t_total += dt;
			if (reps >= 2 * (int)calls && t_total >= min_time)
				break;
		}
		qsort(times, reps, sizeof(double), moe_bench_cmp_double);
		qsort(bws, reps, sizeof(double), moe_bench_cmp_double);
		flops = call_flops(m, n);
		printf("%7u %10.3f %8.1f %10.1f %5.0f%% %10.1f %5.0f%% %9.1f%% %6.1fx %8.1f\n", n,
		       times[reps / 2] * 1e3, avg_distinct, bws[reps / 2] / 1e9,
		       100 * bws[reps / 2] / bw, flops / times[reps / 2] / 1e9,
		       peak > 0 ? 100 * flops / times[reps / 2] / peak : 0.0,
		       100.0 * (double)(moe_engine_transport_ns(e) - tr0) / 1e9 / t_total,
		       llc > 0 ? reuse / llc : 0.0, bw / 1e9);
		print_stages(stage_ns, reps, t_total);
		free(in), free(out), free(ids), free(distinct), free(times), free(bws);
	}
	free(ebuf);
	*rp = r;
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"model", 1, NULL, 'm'},   {"layer", 1, NULL, 'l'}, {"threads", 1, NULL, 't'},
		{"isa", 1, NULL, 'i'},	   {"precision", 1, NULL, 'P'},
		{"tokens", 1, NULL, 'n'},  {"min-time", 1, NULL, 'T'},
		{"device", 1, NULL, 'd'},  {"shape", 1, NULL, 's'}, {"devices", 1, NULL, 'D'},
		{"warm", 0, NULL, 'w'},	   {"help", 0, NULL, 'h'},    {0},
	};
	const char *device = "cpu", *shape = "all";
	bool tokens_given = false, warm = false;
	const char *model = NULL, *isa = NULL, *precision = NULL,
		   *tokens = "1,4,16,64,256,1024,4096";
	struct moe_engine_opts eo = {.max_batch_tokens = 1024};
	char dirbuf[4096], err[MOE_ERRLEN];
	double min_time = 0.5, bw, peak, bf16_peak, amx_peak;
	char amx_why[160];
	const char *peak_what;
	int layer = -1, c;
	uint32_t ranks = 1, layers[MAX_BENCH_LAYERS], nl;
	struct moe_model *m;
	struct moe_engine *e;
	struct moe_pool *pool;
	struct moe_rng r = {99};

	if (argc > 1 && strcmp(argv[1], "ipc") == 0)
		return moe_bench_ipc(argc - 1, argv + 1);
	if (argc > 1 && strcmp(argv[1], "ep") == 0)
		return moe_bench_ep(argc - 1, argv + 1);
	if (argc > 1 && strcmp(argv[1], "panels") == 0)
		return moe_bench_panels(argc - 1, argv + 1);
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			model = optarg;
			break;
		case 'l':
			layer = atoi(optarg);
			break;
		case 't':
			eo.threads = (uint32_t)atoi(optarg);
			break;
		case 'P':
			precision = optarg;
			break;
		case 'i':
			isa = optarg;
			break;
		case 'n':
			tokens = optarg;
			tokens_given = true;
			break;
		case 'd':
			device = optarg;
			break;
		case 'D':
			if (strncmp(optarg, "cpu:", 4) || atoi(optarg + 4) < 1 ||
			    atoi(optarg + 4) > MOE_MAX_RANKS) {
				fprintf(stderr, "moe-bench: --devices %s: expected cpu:R (R 1..%d)\n",
					optarg, MOE_MAX_RANKS);
				return 2;
			}
			ranks = (uint32_t)atoi(optarg + 4);
			break;
		case 's':
			shape = optarg;
			break;
		case 'T':
			min_time = atof(optarg);
			break;
		case 'w':
			warm = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (!strncmp(device, "cuda", 4)) {
#ifdef MOE_HAVE_CUDA
		return moe_bench_cuda(shape, model, tokens_given ? tokens : NULL,
				      device[4] == ':' ? atoi(device + 5) : 0, 24);
#else
		(void)shape, (void)tokens_given;
		fprintf(stderr, "moe-bench: --device %s: built without CUDA (MOE_CUDA=OFF)\n",
			device);
		return 1;
#endif
	}
	if (strcmp(device, "cpu")) {
		fprintf(stderr, "moe-bench: --device %s: expected cpu or cuda[:N]\n", device);
		return 2;
	}
	if (!model)
		model = default_model(dirbuf, sizeof(dirbuf));
	moe_engine_opts_from_env(&eo);
	for (const char *q = tokens; *q;) { /* batches up to the largest size asked */
		unsigned long t = strtoul(q, (char **)&q, 10);

		if (t > eo.max_batch_tokens && t <= 65536)
			eo.max_batch_tokens = (uint32_t)t;
		if (*q)
			q++;
	}
	if (isa)
		eo.tuning.isa = isa;
	eo.tuning.precision = precision;
	if (moe_model_open(model, NULL, &m, err) || moe_engine_create(m, &eo, &e, err)) {
		fprintf(stderr, "moe-bench: %s\n", err);
		return 1;
	}
	if (layer >= 0 && moe_model_layer_pos(m, (uint32_t)layer) < 0) {
		fprintf(stderr, "moe-bench: layer %d is not an MoE layer\n", layer);
		return 1;
	}
	if (layer >= 0) {
		layers[0] = (uint32_t)layer;
		nl = 1;
	} else {
		for (nl = 0; nl < m->n_moe_layers && nl < MAX_BENCH_LAYERS; nl++)
			layers[nl] = m->layers[nl].index;
	}

	/* hardware limits, same threads as the engine */
	if (moe_pool_create(moe_engine_threads(e), &pool)) {
		fprintf(stderr, "moe-bench: cannot start threads\n");
		return 1;
	}
	/* Measured twice, a few seconds apart, keeping the better: on a
	 * shared machine a measurement can only come out low, and a low limit
	 * would flatter the percentages. */
	bw = peak = 0;
	for (int round = 0; round < 2; round++) {
		enum moe_cpu_isa chosen;
		double b = moe_bench_read_bw(pool, (size_t)1 << 30), f;

		moe_cpu_isa_resolve(eo.tuning.isa, NULL, &chosen, err, sizeof(err));
		f = moe_bench_fma_peak(pool, (int)chosen, &peak_what);
		bw = b > bw ? b : bw;
		peak = f > peak ? f : peak;
	}
	bf16_peak = amx_peak = 0;
	for (int round = 0; round < 2; round++) { /* (the better of two, as above) */
		double b = moe_bench_bf16_peak(pool), a = moe_bench_amx_peak(pool, amx_why,
									      sizeof(amx_why));

		bf16_peak = b > bf16_peak ? b : bf16_peak;
		amx_peak = a > amx_peak ? a : amx_peak;
	}
	moe_pool_destroy(pool);

	printf("moe-bench: %s, %u MoE layer%s of %s in rotation: hidden %u, inter %u, %u experts, "
	       "top-%u, %s\n",
	       moe_family_name(m->family), nl, nl > 1 ? "s" : "", model, m->hidden, m->inter,
	       m->n_experts, m->top_k, moe_dtype_name(m->dtype));
	printf("engine: backend %s, %s kernels, %u threads\n", moe_engine_backend(e),
	       moe_engine_kernels(e), moe_engine_threads(e));
	printf("limits: read bandwidth %.1f GB/s (1 GiB, all threads); peak %.1f GFLOP/s %s",
	       bw / 1e9, peak / 1e9, peak_what);
	if (bf16_peak > 0)
		printf("; bf16 dot product (vdpbf16ps) %.1f GFLOP/s", bf16_peak / 1e9);
	else
		printf("; no AVX512_BF16 on this CPU");
	if (amx_peak > 0)
		printf("; AMX tdpbf16ps %.1f GFLOP/s", amx_peak / 1e9);
	else
		printf("; AMX: %s", amx_why);
	printf("; last-level cache %.0f MiB\n", (double)moe_bench_llc_bytes() / (1 << 20));
	/* %peak against the instruction family the experts run on */
	if (!strcmp(moe_engine_kernels(e), "amx") && amx_peak > 0)
		peak = amx_peak, peak_what = "AMX tdpbf16ps";
	else if (!strcmp(moe_engine_kernels(e), "avx512bf16") && bf16_peak > 0)
		peak = bf16_peak, peak_what = "vdpbf16ps";
	printf("%%peak: against the %s peak (the experts' instructions)\n", peak_what);
	moe_engine_destroy(e);
	/* the same layer on 1 rank, then (--devices cpu:R) on R ranks: each
	 * rank its own threads (the same total) and copy of its experts */
	for (uint32_t R = 1; R <= ranks; R = R == 1 && ranks > 1 ? ranks : ranks + 1) {
		eo.n_ranks = R;
		/* (an engine closes the checkpoint once loaded: open it again) */
		moe_model_free(m);
		if (moe_model_open(model, NULL, &m, err) || moe_engine_create(m, &eo, &e, err)) {
			fprintf(stderr, "moe-bench: %u ranks: %s\n", R, err);
			return 1;
		}
		printf("\n%u rank%s (%u threads in all)%s\n", R, R == 1 ? "" : "s",
		       moe_engine_threads(e),
		       R > 1 ? "; transport: local (memcpy between the ranks' own buffers); "
			       "transport = its share of the time"
			     : "; no transport");
		if (run_table(e, m, layers, nl, tokens, min_time, bw, peak, warm, &r))
			return 1;
		moe_engine_destroy(e);
	}
	moe_model_free(m);
	return 0;
}
