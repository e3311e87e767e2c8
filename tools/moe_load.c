/* moe-load — a load generator for moed built on libmoeclient.
 *
 * Forks N client processes; each sends R random requests (random MoE layer,
 * 1..max tokens, f32/bf16 inputs, sync or async) and checks every output
 * against its own in-process engine on the same checkpoint: the daemon's
 * batches must give the same bits as running the request alone (the engine
 * is batch-invariant and both sides pick the same CPU kernels). Prints
 * requests/s, tokens/s and latency percentiles; exits non-zero if any
 * output differs or any request is lost.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "moeclient.h"
#include "tools/synth.h"

struct opts {
	const char *socket, *model;
	int clients, requests, max_tokens, check;
	uint64_t seed;
};

struct result { /* per client, in shared memory */
	int done, mismatched, failed;
	uint64_t tokens;
	double seconds;
	int first_error;
	char why[160];
	float lat_ms[]; /* requests entries */
};

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return x < y ? -1 : x > y;
}

static void child(const struct opts *o, int id, struct result *res)
{
	struct moe_rng r = {o->seed * 1000 + (uint64_t)id + 1};
	moe_connect_options co = {.name = "moe-load", .region_bytes = 64u << 20};
	moe_model_info info;
	struct moe_model *m = NULL;
	struct moe_engine *e = NULL;
	struct moe_engine_opts eo = {.threads = 1, .max_batch_tokens = (uint32_t)o->max_tokens};

	moe_engine_opts_from_env(&eo); /* MOE_CPU_ISA: the kernels moed runs too */
	char err[MOE_ERRLEN];
	moe_client *c;
	size_t cap;
	float *x32, *y32, *ref32;
	uint16_t *x16, *y16, *ref16;
	double t0;
	int ret;

	ret = moe_connect_opts(o->socket, &co, &c);
	if (ret) {
		res->first_error = ret;
		snprintf(res->why, sizeof(res->why), "connect: %s", moe_strerror(ret));
		return;
	}
	moe_get_model_info(c, &info);
	if (o->check && (moe_model_open(o->model, NULL, &m, err) ||
			 moe_engine_create(m, &eo, &e, err))) {
		snprintf(res->why, sizeof(res->why), "reference engine: %.120s", err);
		res->first_error = MOE_EINVAL;
		moe_disconnect(c);
		return;
	}
	cap = (size_t)o->max_tokens * info.hidden;
	x32 = malloc(cap * 4), y32 = malloc(cap * 4), ref32 = malloc(cap * 4);
	x16 = malloc(cap * 2), y16 = malloc(cap * 2), ref16 = malloc(cap * 2);
	t0 = now();
	for (int i = 0; i < o->requests; i++) {
		uint32_t layer = info.moe_layers[moe_rng_next(&r) % info.n_moe_layers];
		uint32_t n = 1 + (uint32_t)(moe_rng_next(&r) % (uint64_t)o->max_tokens);
		bool bf16 = moe_rng_next(&r) & 1;
		size_t cnt = (size_t)n * info.hidden;
		double t;

		/* decode-like sizes are the common case: 3/4 of requests <= 16 */
		if (moe_rng_next(&r) % 4)
			n = 1 + n % 16, cnt = (size_t)n * info.hidden;
		for (size_t k = 0; k < cnt; k++) {
			x32[k] = (float)moe_rng_normal(&r);
			x16[k] = moe_f32_to_bf16(x32[k]);
		}
		t = now();
		ret = moe_forward(c, layer, bf16 ? MOE_DTYPE_BF16 : MOE_DTYPE_F32,
				  bf16 ? (void *)x16 : (void *)x32, bf16 ? (void *)y16 : (void *)y32,
				  n);
		res->lat_ms[i] = (float)((now() - t) * 1e3);
		if (ret) {
			res->failed++;
			if (!res->first_error) {
				res->first_error = ret;
				snprintf(res->why, sizeof(res->why), "request %d: %s", i,
					 moe_strerror(ret));
			}
			if (ret == MOE_EDAEMON)
				break; /* the daemon is gone: nothing more will succeed */
			continue;
		}
		res->done++;
		res->tokens += n;
		if (e) {
			struct moe_epoch *ep = moe_epoch_acquire(e);
			struct moe_batch b = {layer, n, bf16 ? MOE_DT_BF16 : MOE_DT_F32,
					      bf16 ? (void *)x16 : (void *)x32,
					      bf16 ? (void *)ref16 : (void *)ref32, NULL, NULL, 0,
					      NULL, NULL};

			moe_engine_forward(e, ep, &b, err);
			moe_epoch_release(ep);
			if (memcmp(bf16 ? (void *)y16 : (void *)y32, bf16 ? (void *)ref16 : (void *)ref32,
				   cnt * (bf16 ? 2 : 4))) {
				res->mismatched++;
				if (!res->why[0])
					snprintf(res->why, sizeof(res->why),
						 "request %d (layer %u, %u tokens, %s) differs from "
						 "the in-process engine",
						 i, layer, n, bf16 ? "bf16" : "f32");
			}
		}
	}
	res->seconds = now() - t0;
	free(x32), free(y32), free(ref32), free(x16), free(y16), free(ref16);
	moe_engine_destroy(e);
	moe_model_free(m);
	moe_disconnect(c);
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{"socket", 1, NULL, 's'},  {"model", 1, NULL, 'm'}, {"clients", 1, NULL, 'c'},
		{"requests", 1, NULL, 'n'}, {"max-tokens", 1, NULL, 't'}, {"no-check", 0, NULL, 'x'},
		{"seed", 1, NULL, 'r'},	   {0},
	};
	struct opts o = {.clients = 4, .requests = 200, .max_tokens = 64, .check = 1, .seed = 1};
	size_t rsz;
	char *shared;
	int ch, bad = 0, done = 0, failed = 0;
	uint64_t tokens = 0;
	double secs = 0;
	float *all;

	while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (ch) {
		case 's': o.socket = optarg; break;
		case 'm': o.model = optarg; break;
		case 'c': o.clients = atoi(optarg); break;
		case 'n': o.requests = atoi(optarg); break;
		case 't': o.max_tokens = atoi(optarg); break;
		case 'x': o.check = 0; break;
		case 'r': o.seed = strtoull(optarg, NULL, 10); break;
		default:
			fprintf(stderr, "usage: moe-load --socket PATH --model DIR [--clients N] "
					"[--requests R] [--max-tokens T] [--no-check]\n");
			return 2;
		}
	}
	if (!o.socket || (o.check && !o.model) || o.clients < 1 || o.requests < 1 ||
	    o.max_tokens < 1) {
		fprintf(stderr, "moe-load: --socket (and --model to check outputs) are required\n");
		return 2;
	}
	rsz = (sizeof(struct result) + (size_t)o.requests * sizeof(float) + 63) & ~(size_t)63;
	shared = mmap(NULL, rsz * o.clients, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
		      -1, 0);
	if (shared == MAP_FAILED)
		return 1;
	for (int i = 0; i < o.clients; i++) {
		pid_t p = fork();

		if (p == 0) {
			/* killed with its parent (a test that kills moe-load
			 * must not leave its clients running) */
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() == 1)
				_exit(1);
			child(&o, i, (struct result *)(shared + rsz * i));
			_exit(0);
		}
	}
	for (int i = 0; i < o.clients; i++) {
		int st;

		if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
			bad++;
	}
	all = malloc((size_t)o.clients * o.requests * sizeof(float));
	int nl = 0;
	for (int i = 0; i < o.clients; i++) {
		struct result *res = (struct result *)(shared + rsz * i);

		done += res->done;
		failed += res->failed;
		tokens += res->tokens;
		secs = res->seconds > secs ? res->seconds : secs;
		bad += res->mismatched;
		for (int k = 0; k < res->done + res->failed && k < o.requests; k++)
			all[nl++] = res->lat_ms[k];
		if (res->why[0])
			fprintf(stderr, "client %d: %s\n", i, res->why);
		if (res->done + res->failed != o.requests)
			fprintf(stderr, "client %d: %d of %d requests answered\n", i,
				res->done + res->failed, o.requests);
		if (res->done + res->failed != o.requests || res->mismatched)
			bad++;
	}
	qsort(all, nl, sizeof(float), cmp_float);
	printf("moe-load: %d clients x %d requests: %d ok, %d failed, %s; %.0f requests/s, "
	       "%.0f tokens/s; latency p50 %.2f ms, p99 %.2f ms, max %.2f ms\n",
	       o.clients, o.requests, done, failed,
	       o.check ? (bad ? "OUTPUTS DIFFER" : "every output identical to the in-process engine")
		       : "outputs not checked",
	       secs > 0 ? done / secs : 0, secs > 0 ? tokens / secs : 0,
	       nl ? all[nl / 2] : 0, nl ? all[(size_t)(nl * 0.99)] : 0, nl ? all[nl - 1] : 0);
	free(all);
	return bad || failed ? 1 : 0;
}
