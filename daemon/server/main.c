/* moed — the Mixture-of-Experts serving daemon.
 *
 *   moed -c moe.yaml                 load the model, serve until SIGTERM/SIGINT
 *   moed --model DIR --socket PATH   the same without a configuration file
 *   moed -t -c moe.yaml              check configuration + checkpoint, print the plan
 *   moed --load-only --model DIR     load every expert, verify, report, exit
 *
 * Runs in the foreground and logs to stderr with <N> syslog priorities.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdbool.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/server/config.h"
#include "daemon/engine/engine.h"
#include "daemon/engine/log.h"
#include "daemon/engine/model.h"
#include "daemon/server/plan.h"
#include "daemon/server/server.h"

#ifdef MOE_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

static void usage(FILE *f)
{
	fprintf(f,
		"usage: moed [-c FILE] [--model DIR] [options] [-t | --load-only]\n"
		"  -c, --config FILE   configuration (moe.yaml); without it, defaults + --model\n"
		"                      (without -t / --load-only: serve until SIGTERM)\n"
		"  -t, --test          check the configuration and the checkpoint, print the\n"
		"                      plan (ranks, slots, bytes per rank, fits or not); exit 0/1\n"
		"      --load-only     load every expert into memory, verify, report, exit\n"
		"      --model DIR     override model.path\n"
		"      --family NAME   override model.family\n"
		"      --socket PATH   override server.socket\n"
		"      --devices SPEC  override devices (cpu, cpu:R for R CPU ranks, cuda, cuda:N\n"
		"                      for GPU N)\n"
		"      --threads N     override cpu.threads\n"
		"  -h, --help          this text\n"
		"      --version       print the version\n");
}

struct overrides {
	const char *model, *family, *threads, *socket, *devices;
};

static int apply_overrides(struct moe_config *c, const struct overrides *o)
{
	if (o->model) {
		free(c->model.path);
		if (!(c->model.path = strdup(o->model)))
			return -ENOMEM;
	}
	if (o->family) {
		free(c->model.family);
		if (!(c->model.family = strdup(o->family)))
			return -ENOMEM;
	}
	if (o->socket) {
		if (strlen(o->socket) > 107) {
			fprintf(stderr, "moed: --socket: path longer than 107 bytes\n");
			return -EINVAL;
		}
		free(c->server.socket);
		if (!(c->server.socket = strdup(o->socket)))
			return -ENOMEM;
	}
	if (o->devices) {
		char *end;
		long id = !strncmp(o->devices, "cuda:", 5) ? strtol(o->devices + 5, &end, 10) : -1;

		long ranks = !strncmp(o->devices, "cpu:", 4) ? strtol(o->devices + 4, &end, 10) : 0;

		if (!strcmp(o->devices, "cpu") ||
		    (ranks >= 1 && ranks <= MOE_CFG_MAX_CPU_RANKS && !*end && o->devices[4])) {
			c->devices.kind = MOE_CFG_DEV_CPU;
			c->devices.n_ranks = ranks ? (unsigned)ranks : 1;
			c->devices.all_gpus = false;
		} else if (!strcmp(o->devices, "cuda") ||
			   (id >= 0 && id < MOE_CFG_MAX_GPUS && !*end && o->devices[5])) {
#ifndef MOE_HAVE_CUDA
			fprintf(stderr, "moed: --devices %s: this moed was built without CUDA "
				"(MOE_CUDA=OFF)\n", o->devices);
			return -EINVAL;
#endif
			c->devices.kind = MOE_CFG_DEV_CUDA;
			c->devices.all_gpus = id < 0;
			c->devices.n_ranks = id < 0 ? 0 : 1;
			c->devices.gpu_ids[0] = (uint8_t)(id < 0 ? 0 : id);
		} else {
			fprintf(stderr, "moed: --devices %s: expected cpu, cpu:R (R CPU ranks, 1 to "
				"%d), cuda or cuda:N (N a GPU index)\n", o->devices,
				MOE_CFG_MAX_CPU_RANKS);
			return -EINVAL;
		}
	}
	if (o->threads) {
		char *end;
		long v = strtol(o->threads, &end, 10);

		if (*end || v < 0 || v > 1024) {
			fprintf(stderr, "moed: --threads: expected an integer 0..1024\n");
			return -EINVAL;
		}
		c->cpu.threads = (unsigned)v;
	}
	return 0;
}

/* SIGTERM, SIGINT and SIGHUP are blocked from the first line of main, before
 * any thread exists, so that every thread inherits the mask: the server
 * reads them from a signalfd, and no thread (ours, or the CUDA driver's and
 * cuBLAS' own, which start while the engine loads) ever takes their
 * default action, which would kill moed mid-batch instead of draining. */
static void block_signals(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGHUP);
	sigprocmask(SIG_BLOCK, set, NULL);
}

/* After each layer: a pending SIGTERM or SIGINT stops the load (a large
 * model takes minutes); a SIGHUP waits for the server. */
static int load_progress(void *arg, uint32_t done, uint32_t total)
{
	sigset_t pend;

	(void)arg;
	moe_log(LOG_DEBUG, "loaded layer %u of %u", done, total);
#ifdef MOE_HAVE_SYSTEMD
	/* each layer buys another minute of start-up time */
	sd_notifyf(0, "EXTEND_TIMEOUT_USEC=60000000\nSTATUS=loading: %u of %u MoE layers",
		   done, total);
#endif
	sigpending(&pend);
	return sigismember(&pend, SIGTERM) || sigismember(&pend, SIGINT);
}

/* A quarter of the host's memory (at least 64 MiB): the default of
 * server.max_total_shm_bytes and reload.max_staging_bytes. */
static uint64_t quarter_of_memory(void)
{
	long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
	uint64_t q = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page / 4 : 1ULL << 30;

	return q > (64ULL << 20) ? q : 64ULL << 20;
}

/* server.max_total_shm_bytes: what the clients' regions may make moed hold. */
static uint64_t total_shm(const struct moe_config *c)
{
	return c->server.max_total_shm_bytes ? c->server.max_total_shm_bytes
					     : quarter_of_memory();
}

static int group_id(const char *name, const char *key, gid_t *gid)
{
	struct group *g;

	if (!name || !*name)
		return 0;
	g = getgrnam(name);
	if (!g) {
		moe_log(LOG_ERR, "%s: no group named \"%s\"", key, name);
		return -ENOENT;
	}
	*gid = g->gr_gid;
	return 1;
}

/* The socket systemd passed (socket activation), or -1 for none; -2 when
 * what it passed is not one listening SOCK_SEQPACKET Unix socket. */
static int activated_socket(void)
{
#ifdef MOE_HAVE_SYSTEMD
	int n = sd_listen_fds(1);

	if (n <= 0)
		return -1;
	if (n != 1 || sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_SEQPACKET, 1, NULL, 0) <= 0) {
		moe_log(LOG_ERR, "socket activation: expected one listening SOCK_SEQPACKET Unix "
			"socket, got %d fds", n);
		return -2;
	}
	fcntl(SD_LISTEN_FDS_START, F_SETFL, fcntl(SD_LISTEN_FDS_START, F_GETFL) | O_NONBLOCK);
	return SD_LISTEN_FDS_START;
#else
	return -1;
#endif
}

/* ---- configuration reload (SIGHUP, moectl reload-config) --------------- */

struct reload_ctx {
	const char *file;
	struct moe_config *live;
	const struct overrides *ov; /* the command line wins over the file, then too */
};

/* Everything the configuration sets in the server's options, at start and
 * at each reload: the one place the mapping lives. What the server learns
 * itself (the socket's group, the listening fd, the GPU's name, the reload
 * hook, test hooks) is left as it is. */
static void server_opts(const struct moe_config *c, struct moe_server_opts *o)
{
	o->socket_path = c->server.socket;
	o->socket_mode = c->server.socket_mode;
	o->max_clients = c->server.max_clients;
	o->max_client_shm_bytes = c->server.max_client_shm_bytes;
	o->max_total_shm_bytes = total_shm(c);
	o->max_inflight_requests = c->server.max_inflight_requests;
	o->max_inflight_tokens = c->server.max_inflight_tokens;
	o->max_queue_requests = c->scheduler.max_queue_requests;
	o->request_timeout_ms = c->scheduler.request_timeout_ms;
	o->handshake_timeout_ms = c->server.handshake_timeout_ms;
	o->copy_bytes_per_s = c->placement.copy_bytes_per_s;
	o->auto_rebalance = c->placement.auto_rebalance;
	o->rebalance_threshold = c->placement.rebalance_threshold;
	o->rebalance_interval_s = c->placement.rebalance_interval_s;
	o->model_path = c->model.path;
	o->reload_max_staging_bytes = c->reload.max_staging_bytes
					      ? c->reload.max_staging_bytes
					      : quarter_of_memory();
	o->reload_keep_previous = c->reload.keep_previous;
	o->reload_bytes_per_s = c->reload.bytes_per_s;
	o->admin_group = c->server.admin_group;
	o->log_level = (int)c->log.level;
	o->metrics_listen = c->metrics.listen;
	o->metrics_per_expert = c->metrics.per_expert;
	o->metrics_slo_ms = c->metrics.slo_p99_ms;
}

/* Applies what can change while serving (the keys the configuration table
 * marks .reload); names what needs a restart. */
static int reload(void *arg, struct moe_server_opts *o, char *msg, size_t n)
{
	struct reload_ctx *r = arg;
	struct moe_config nc;
	char err[MOE_CFG_ERRLEN], restart[200] = "";
	gid_t admin = 0;
	int ret, has_admin;

	ret = moe_cfg_load_file(r->file, &nc, err, sizeof(err));
	if (ret) {
		snprintf(msg, n, "%s", err);
		return ret;
	}
	if (apply_overrides(&nc, r->ov)) {
		snprintf(msg, n, "cannot apply the command-line overrides");
		moe_cfg_free(&nc);
		return -EINVAL;
	}
	has_admin = group_id(nc.server.admin_group, "server.admin_group", &admin);
	if (has_admin < 0) {
		snprintf(msg, n, "server.admin_group: no group named \"%s\"", nc.server.admin_group);
		moe_cfg_free(&nc);
		return -EINVAL;
	}
	moe_cfg_reload(r->live, &nc, restart, sizeof(restart));
	server_opts(r->live, o);
	o->auth.has_admin_gid = has_admin > 0;
	o->auth.admin_gid = admin;
	snprintf(msg, n, "limits, scheduler, admin group and log level applied%s%s%s",
		 restart[0] ? "; needs a restart: " : "", restart, restart[0] ? " (unchanged)" : "");
	moe_cfg_free(&nc);
	return 0;
}

/* moed's test hooks, from the environment (MOED_TEST_*) */
struct test_hooks {
	uint32_t stall_ms, trace_ring;
};

static int run_engine(struct moe_config *c, struct moe_model *m, bool serve, const char *cfg_file,
		      const struct overrides *ov, const struct moe_plan *plan,
		      const struct moe_engine_opts *env, const struct test_hooks *th)
{
	struct moe_engine_opts eo = {.threads = c->cpu.threads,
				     .max_batch_tokens = c->scheduler.max_batch_tokens,
				     .n_ranks = c->devices.kind == MOE_CFG_DEV_CPU ? c->devices.n_ranks : 1,
				     .spare_slots = c->placement.spare_slots,
				     .stats_window_ms = c->placement.stats_window_s * 1000u,
				     .backend = plan->backend,
				     .device = plan->device,
				     .progress = load_progress,
				     .tuning = env->tuning,
				     .test_fault_at = env->test_fault_at,
				     .test_rank_fault_rank = env->test_rank_fault_rank,
				     .test_rank_fault_at = env->test_rank_fault_at};
	struct moe_engine *e;
	char err[MOE_ERRLEN];
	struct timespec t0, t1;
	double s;
	int ret;

	if (!eo.tuning.isa)
		eo.tuning.isa = moe_cfg_isa_name(c->cpu.isa);
	eo.tuning.precision = moe_cfg_precision_name(c->cpu.precision);
	if (strcmp(plan->backend, "cuda"))
		moe_log(LOG_NOTICE, "serving on the CPU; GPU: %s", plan->device_note);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ret = moe_engine_create(m, &eo, &e, err);
	if (ret == -ECANCELED) { /* SIGTERM or SIGINT while loading: a clean stop */
		moe_log(LOG_NOTICE, "%s: stopped by a signal", err);
		return 0;
	}
	if (ret) {
		moe_log(LOG_ERR, "loading failed: %s", err);
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
	moe_log(LOG_INFO, "loaded %u MoE layers, %.1f MiB of weights in %.2f s (%.0f MiB/s), "
		"backend %s on %s",
		m->n_moe_layers, (double)moe_engine_weight_bytes(e) / (1 << 20), s,
		(double)moe_engine_weight_bytes(e) / (1 << 20) / (s > 0 ? s : 1),
		moe_engine_backend(e), moe_engine_device(e));
	if (serve) {
		struct reload_ctx rc = {cfg_file, c, ov};
		gid_t sock_gid = 0, admin_gid = 0;
		int has_sock = group_id(c->server.group, "server.group", &sock_gid);
		int has_admin = group_id(c->server.admin_group, "server.admin_group", &admin_gid);
		int lfd = activated_socket();

		if (has_sock < 0 || has_admin < 0 || lfd == -2) {
			moe_engine_destroy(e);
			return 1;
		}
		struct moe_server_opts so = {
			.listen_fd = lfd,
			.gpu = strcmp(plan->backend, "cuda") ? plan->device_note
							     : moe_engine_device(e),
			.auth = {.has_socket_gid = has_sock > 0, .socket_gid = sock_gid,
				 .has_admin_gid = has_admin > 0, .admin_gid = admin_gid},
			.reload = cfg_file ? reload : NULL,
			.reload_arg = &rc,
			.test_stall_ms = th->stall_ms,
			.test_trace_ring = th->trace_ring,
		};
		int code;

		server_opts(c, &so);
		code = moe_server_run(e, &so);

		moe_engine_destroy(e);
		return code;
	}
	moe_engine_destroy(e);
	return 0;
}

int main(int argc, char **argv)
{
	enum { OPT_MODEL = 256, OPT_FAMILY, OPT_THREADS, OPT_VERSION, OPT_LOAD, OPT_SOCKET,
	       OPT_DEVICES };
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"test", no_argument, NULL, 't'},
		{"load-only", no_argument, NULL, OPT_LOAD},
		{"model", required_argument, NULL, OPT_MODEL},
		{"family", required_argument, NULL, OPT_FAMILY},
		{"threads", required_argument, NULL, OPT_THREADS},
		{"socket", required_argument, NULL, OPT_SOCKET},
		{"devices", required_argument, NULL, OPT_DEVICES},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{0},
	};
	struct overrides ov = {0};
	const char *cfg_file = NULL;
	struct moe_config cfg;
	struct moe_model *m = NULL;
	struct moe_model_opts mo = {0};
	struct moe_plan plan;
	struct moe_engine_opts env = {0};
	struct test_hooks th = {0};
	bool isa_ok;
	char err[MOE_CFG_ERRLEN > MOE_ERRLEN ? MOE_CFG_ERRLEN : MOE_ERRLEN];
	int test = 0, load = 0, c, ret;
	sigset_t sigs;

	while ((c = getopt_long(argc, argv, "c:th", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			cfg_file = optarg;
			break;
		case 't':
			test = 1;
			break;
		case OPT_LOAD:
			load = 1;
			break;
		case OPT_MODEL:
			ov.model = optarg;
			break;
		case OPT_FAMILY:
			ov.family = optarg;
			break;
		case OPT_THREADS:
			ov.threads = optarg;
			break;
		case OPT_SOCKET:
			ov.socket = optarg;
			break;
		case OPT_DEVICES:
			ov.devices = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case OPT_VERSION:
			printf("moed 0.1.0\n");
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc || (!cfg_file && !ov.model)) {
		usage(stderr);
		return 2;
	}
	if (!test)
		block_signals(&sigs);
	/* The environment is read here and only here (the libraries never
	 * read it): kernel choices and test hooks. */
	moe_engine_opts_from_env(&env);
	if (getenv("MOED_TEST_STALL_MS"))
		th.stall_ms = (uint32_t)strtoul(getenv("MOED_TEST_STALL_MS"), NULL, 10);
	if (getenv("MOED_TEST_TRACE_RING"))
		th.trace_ring = (uint32_t)strtoul(getenv("MOED_TEST_TRACE_RING"), NULL, 10);
	ret = cfg_file ? moe_cfg_load_file(cfg_file, &cfg, err, sizeof(err)) : moe_cfg_defaults(&cfg);
	if (ret) {
		fprintf(stderr, "moed: %s\n", cfg_file ? err : strerror(-ret));
		moe_cfg_free(&cfg);
		return 1;
	}
	if (apply_overrides(&cfg, &ov) || !cfg.model.path) {
		if (!cfg.model.path)
			fprintf(stderr, "moed: model.path is required\n");
		moe_cfg_free(&cfg);
		return 1;
	}
	moe_log_set_level((int)cfg.log.level);
	mo.family = cfg.model.family;
	if (moe_model_open(cfg.model.path, &mo, &m, err)) {
		fprintf(stderr, "moed: %s\n", err);
		moe_cfg_free(&cfg);
		return 1;
	}
	moe_plan_compute(&cfg, m, env.tuning.isa, &plan);
	/* the CPU kernels matter only when the CPU serves */
	isa_ok = plan.isa >= 0 || !strcmp(plan.backend, "cuda");
	if (test) {
		moe_plan_print(stdout, &cfg, m, &plan);
		ret = plan.fits && isa_ok && plan.device_ok ? 0 : 1;
	} else {
		ret = plan.fits && isa_ok && plan.device_ok
			      ? run_engine(&cfg, m, !load, cfg_file, &ov, &plan, &env, &th)
			      : 1;
		if (!plan.fits)
			moe_log(LOG_ERR, "the model does not fit in %s memory (moed -t shows the plan)",
				strcmp(plan.backend, "cuda") ? "host" : "GPU");
		if (!isa_ok)
			moe_log(LOG_ERR, "%s", plan.isa_err);
		if (!plan.device_ok)
			moe_log(LOG_ERR, "%s", plan.device_note);
	}
	moe_model_free(m);
	moe_cfg_free(&cfg);
	return ret;
}
