/* tests/daemon_harness.c — the harness shared by the suites that run a real
 * moed (see daemon_harness.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/daemon_harness.h"

#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "ipc/moe_proto.h"
#include "kernels/cpu/convert.h"
#include "tools/synth.h"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

uint64_t dh_now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u;
}

void dh_nap_ms(int ms)
{
	poll(NULL, 0, ms);
}

size_t dh_dt_size(int dt)
{
	return dt == MOE_DTYPE_F32 ? 4 : 2;
}

/* ------------------------------------------------------------------------ */
/* The in-process reference: the same fixture through daemon/engine/engine.h       */

struct moe_model *g_model;
struct moe_engine *g_eng;
uint32_t g_H;

int dh_group_setup(void **state)
{
	struct moe_engine_opts o = {.threads = 1, .max_batch_tokens = 4096};
	char err[MOE_ERRLEN];

	(void)state;
	moe_engine_opts_from_env(&o); /* the same kernels as the daemon under test */
	if (moe_model_open(DH_FIXTURE, NULL, &g_model, err)) {
		fprintf(stderr, "%s\n", err);
		return -1;
	}
	if (moe_engine_create(g_model, &o, &g_eng, err)) {
		fprintf(stderr, "%s\n", err);
		return -1;
	}
	g_H = g_model->hidden;
	return 0;
}

int dh_group_teardown(void **state)
{
	(void)state;
	moe_engine_destroy(g_eng);
	moe_model_free(g_model);
	return 0;
}

void dh_ref_forward(uint32_t layer, int dt, const void *in, void *out, uint32_t n)
{
	struct moe_epoch *ep = moe_epoch_acquire(g_eng);
	struct moe_batch b = {layer, n, (enum moe_dtype)dt, in, out, NULL, NULL, 0, NULL, NULL};
	char err[MOE_ERRLEN];
	int r = moe_engine_forward(g_eng, ep, &b, err);

	moe_epoch_release(ep);
	if (r)
		fail_msg("reference forward: %s", err);
}

void *dh_make_input(int dt, uint32_t n, uint64_t seed)
{
	size_t cnt = (size_t)n * g_H;
	float *f = malloc(cnt * sizeof(float));
	void *p = malloc(cnt * dh_dt_size(dt));
	struct moe_rng rng = {seed * 0x9e3779b97f4a7c15ull + 1};

	assert_non_null(f);
	assert_non_null(p);
	for (size_t i = 0; i < cnt; i++)
		f[i] = (float)moe_rng_normal(&rng);
	if (dt == MOE_DTYPE_F32)
		memcpy(p, f, cnt * sizeof(float));
	else
		moe_cpu_from_f32((enum moe_dtype)dt, f, p, cnt);
	free(f);
	return p;
}

/* ------------------------------------------------------------------------ */
/* Daemons                                                                  */

struct daemon *g_daemons[DH_MAX_DAEMONS];
moe_client *g_clients[DH_MAX_CLIENTS];
bool g_passed;

void dh_dump_log(const struct daemon *d)
{
	FILE *f = fopen(d->log, "r");
	char line[512];

	printf("---- moed stderr (%s) ----\n", d->log);
	if (f) {
		while (fgets(line, sizeof(line), f))
			printf("  | %s", line);
		fclose(f);
	}
	printf("---- end of moed stderr ----\n");
	if (d->nfd >= 0) {
		printf("---- sd_notify messages received ----\n%s---- end ----\n",
		       d->notes ? d->notes : "");
	}
	fflush(stdout);
}

struct daemon *dh_daemon_new(const char *model, bool notify, int ready_ms)
{
	struct daemon *d = calloc(1, sizeof(*d));
	int i;

	assert_non_null(d);
	d->nfd = -1;
	d->ready_ms = ready_ms;
	d->dir = tu_tmpdir();
	d->model = strdup(model);
	assert_true(asprintf(&d->sock, "%s/moed.sock", d->dir) > 0);
	assert_true(asprintf(&d->log, "%s/moed.stderr", d->dir) > 0);
	if (notify) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		int big = 1 << 20;

		assert_true(asprintf(&d->notify_path, "%s/notify", d->dir) > 0);
		assert_true(strlen(d->notify_path) < sizeof(sa.sun_path));
		strcpy(sa.sun_path, d->notify_path);
		d->nfd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		assert_true(d->nfd >= 0);
		assert_int_equal(bind(d->nfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
		setsockopt(d->nfd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	}
	for (i = 0; i < DH_MAX_DAEMONS && g_daemons[i]; i++)
		;
	assert_true(i < DH_MAX_DAEMONS);
	g_daemons[i] = d;
	return d;
}

void dh_daemon_write_cfg(struct daemon *d, const char *extra)
{
	char *text;
	FILE *f;

	if (!d->cfg)
		assert_true(asprintf(&d->cfg, "%s/moe.yaml", d->dir) > 0);
	assert_true(asprintf(&text, "model:\n  path: %s\n%s", d->model, extra) > 0);
	/* rewrite in place (the path moed was given stays the same) */
	f = fopen(d->cfg, "w");
	assert_non_null(f);
	assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
	assert_int_equal(fclose(f), 0);
	free(text);
}

void dh_daemon_env(struct daemon *d, const char *fmt, ...)
{
	va_list ap;
	int i;

	for (i = 0; i < DH_MAX_ENV && d->env[i]; i++)
		;
	assert_true(i < DH_MAX_ENV - 1);
	va_start(ap, fmt);
	assert_true(vasprintf(&d->env[i], fmt, ap) > 0);
	va_end(ap);
}

int dh_daemon_wait_exit(struct daemon *d, int ms)
{
	uint64_t deadline = dh_now_ms() + (uint64_t)ms;
	int st;

	assert_true(d->pid > 0);
	for (;;) {
		pid_t w = waitpid(d->pid, &st, WNOHANG);

		if (w == d->pid) {
			d->pid = 0;
			return st;
		}
		assert_int_equal(w, 0);
		if (dh_now_ms() > deadline) {
			kill(d->pid, SIGKILL);
			waitpid(d->pid, &st, 0);
			d->pid = 0;
			fail_msg("moed did not exit within %d ms", ms);
		}
		dh_nap_ms(2);
	}
}

void dh_expect_alive(struct daemon *d, const char *after)
{
	int st;

	if (d->pid > 0 && waitpid(d->pid, &st, WNOHANG) == d->pid) {
		d->pid = 0;
		fail_msg("moed died after %s (wait status 0x%x)", after, st);
	}
	assert_true(d->pid > 0);
}

void dh_daemon_spawn(struct daemon *d)
{
	char *dargv[8];
	char **argv = d->argv ? d->argv : dargv;
	int i = 0, fd;

	dargv[i++] = DH_MOED;
	if (d->cfg) {
		dargv[i++] = "-c";
		dargv[i++] = d->cfg;
	} else {
		dargv[i++] = "--model";
		dargv[i++] = d->model;
	}
	if (d->socket_arg) {
		dargv[i++] = "--socket";
		dargv[i++] = d->sock;
	}
	dargv[i] = NULL;
	fflush(stdout);
	fflush(stderr);
	d->pid = fork();
	assert_true(d->pid >= 0);
	if (d->pid == 0) {
		sigset_t none;

		fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		unsetenv("NOTIFY_SOCKET");
		unsetenv("WATCHDOG_USEC");
		unsetenv("WATCHDOG_PID");
		unsetenv("LISTEN_FDS");
		unsetenv("LISTEN_PID");
		unsetenv("LISTEN_FDNAMES");
		unsetenv("MOED_TEST_STALL_MS");
		if (d->notify_path)
			setenv("NOTIFY_SOCKET", d->notify_path, 1);
		for (i = 0; i < DH_MAX_ENV && d->env[i]; i++)
			putenv(d->env[i]);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		execv(argv[0], argv);
		_exit(127);
	}
}

void dh_daemon_start(struct daemon *d)
{
	uint64_t deadline;
	int fd;

	dh_daemon_spawn(d);
	if (d->nfd >= 0)
		return; /* the caller reads the notify messages */
	deadline = dh_now_ms() + (uint64_t)d->ready_ms;
	for (;;) {
		int st;

		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			d->pid = 0;
			fail_msg("moed exited during startup (wait status 0x%x)", st);
		}
		fd = dh_raw_socket(d->sock);
		if (fd >= 0) {
			char b = 0x5a;
			int left = (int)(deadline > dh_now_ms() ? deadline - dh_now_ms() : 1);

			assert_int_equal(send(fd, &b, 1, MSG_NOSIGNAL), 1);
			if (!dh_raw_hangup(fd, left, NULL)) {
				close(fd);
				fail_msg("moed accepted a connection but did not hang up on garbage");
			}
			close(fd);
			return;
		}
		if (dh_now_ms() > deadline)
			fail_msg("moed did not accept connections on %s within %d ms", d->sock,
				 d->ready_ms);
		dh_nap_ms(5);
	}
}

void dh_daemon_stop(struct daemon *d)
{
	int st;

	assert_int_equal(kill(d->pid, SIGTERM), 0);
	st = dh_daemon_wait_exit(d, DH_EXIT_MS);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail_msg("moed did not exit cleanly after SIGTERM: wait status 0x%x%s", st,
			 WIFSIGNALED(st) ? " (killed by a signal)" : "");
}

void dh_daemon_freeze(struct daemon *d)
{
	int st;

	assert_int_equal(kill(d->pid, SIGSTOP), 0);
	assert_int_equal(waitpid(d->pid, &st, WUNTRACED), d->pid);
	assert_true(WIFSTOPPED(st));
}

void dh_daemon_thaw(struct daemon *d)
{
	assert_int_equal(kill(d->pid, SIGCONT), 0);
}

void dh_daemon_free(struct daemon *d)
{
	for (int i = 0; i < DH_MAX_DAEMONS; i++)
		if (g_daemons[i] == d)
			g_daemons[i] = NULL;
	if (d->pid > 0) {
		kill(d->pid, SIGKILL);
		waitpid(d->pid, NULL, 0);
	}
	if (d->nfd >= 0)
		close(d->nfd);
	tu_rmtree(d->dir);
	free(d->dir);
	free(d->sock);
	free(d->log);
	free(d->cfg);
	free(d->model);
	free(d->notify_path);
	free(d->notes);
	for (int i = 0; i < DH_MAX_ENV; i++)
		free(d->env[i]);
	free(d);
}

int dh_count_fds(pid_t pid)
{
	char path[64];
	DIR *dir;
	struct dirent *e;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	dir = opendir(path);
	assert_non_null(dir);
	while ((e = readdir(dir)))
		if (e->d_name[0] != '.')
			n++;
	closedir(dir);
	return n;
}

/* ------------------------------------------------------------------------ */
/* Setup / teardown of each test                                            */

int dh_setup(void **state)
{
	(void)state;
	g_passed = false;
	return 0;
}

void dh_close_clients(void)
{
	for (int i = 0; i < DH_MAX_CLIENTS; i++)
		if (g_clients[i]) {
			moe_disconnect(g_clients[i]);
			g_clients[i] = NULL;
		}
}

void dh_reap_daemons(void)
{
	for (int i = 0; i < DH_MAX_DAEMONS; i++) {
		struct daemon *d = g_daemons[i];

		if (!d)
			continue;
		if (d->pid > 0) {
			kill(d->pid, SIGCONT);
			kill(d->pid, SIGKILL);
			waitpid(d->pid, NULL, 0);
			d->pid = 0;
		}
		if (!g_passed)
			dh_dump_log(d);
		dh_daemon_free(d);
	}
}

int dh_teardown(void **state)
{
	(void)state;
	dh_close_clients();
	dh_reap_daemons();
	return 0;
}

/* ------------------------------------------------------------------------ */
/* libmoeclient clients                                                     */

void dh_cl_track(moe_client *c)
{
	int i;

	for (i = 0; i < DH_MAX_CLIENTS && g_clients[i]; i++)
		;
	assert_true(i < DH_MAX_CLIENTS);
	g_clients[i] = c;
}

void dh_cl_close(moe_client *c)
{
	for (int i = 0; i < DH_MAX_CLIENTS; i++)
		if (g_clients[i] == c)
			g_clients[i] = NULL;
	moe_disconnect(c);
}

void dh_req_submit(moe_client *c, struct req *q, uint32_t layer, int dt, uint32_t n,
		   uint64_t seed, uint32_t timeout_ms)
{
	size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
	int r;

	q->layer = layer;
	q->dt = dt;
	q->n = n;
	q->copy = dh_make_input(dt, n, seed);
	q->in = moe_buf_alloc(c, bytes);
	q->out = moe_buf_alloc(c, bytes);
	assert_non_null(q->in);
	assert_non_null(q->out);
	memcpy(q->in, q->copy, bytes);
	memset(q->out, 0xff, bytes);
	r = moe_submit(c, layer, (moe_dtype)dt, q->in, q->out, n, timeout_ms, &q->tag);
	if (r)
		fail_msg("moe_submit(layer %u, %u tokens): %s", layer, n, moe_strerror(r));
}

void dh_req_free(moe_client *c, struct req *q)
{
	moe_buf_free(c, q->in);
	moe_buf_free(c, q->out);
	free(q->copy);
	q->copy = q->in = q->out = NULL;
}

/* ------------------------------------------------------------------------ */
/* Status JSON                                                              */

cJSON *dh_jget(const cJSON *o, const char *key, int type)
{
	cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);

	if (!v)
		fail_msg("status JSON: no key \"%s\"", key);
	if (!(v->type & type))
		fail_msg("status JSON: \"%s\" has the wrong type", key);
	return v;
}

double dh_jnum(const cJSON *o, const char *key)
{
	return dh_jget(o, key, cJSON_Number)->valuedouble;
}

cJSON *dh_status(moe_client *c, bool check_len)
{
	char *json = NULL;
	size_t len = 0;
	int r = moe_status_json(c, &json, &len);
	cJSON *j;

	if (r)
		fail_msg("moe_status_json: %s", moe_strerror(r));
	assert_non_null(json);
	if (check_len)
		assert_int_equal(strlen(json), len);
	j = cJSON_Parse(json);
	if (!j)
		fail_msg("status JSON does not parse: %.200s", json);
	free(json);
	return j;
}

/* ------------------------------------------------------------------------ */
/* Raw connections                                                          */

int dh_raw_socket(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	assert_true(fd >= 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

int *g_resets;

ssize_t dh_raw_recv(int fd, void *buf, size_t cap, int ms)
{
	uint64_t deadline = dh_now_ms() + (uint64_t)(ms < 0 ? 0 : ms);

	for (;;) {
		union {
			char b[CMSG_SPACE(sizeof(int) * 8)];
			struct cmsghdr align;
		} u;
		struct iovec iov = {buf, cap};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				    .msg_controllen = sizeof(u.b)};
		struct pollfd p = {fd, POLLIN, 0};
		uint64_t t = dh_now_ms();
		ssize_t n;

		n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == ECONNRESET) {
			/* the peer closed with data of ours unread: reported
			 * once, before what it sent us; then EOF */
			if (g_resets)
				(*g_resets)++;
			continue;
		}
		if (n >= 0 || (errno != EAGAIN && errno != EINTR)) {
			if (n < 0)
				return -errno;
			for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm;
			     cm = CMSG_NXTHDR(&mh, cm))
				if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
					for (size_t k = 0;
					     k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
						int x;

						memcpy(&x, CMSG_DATA(cm) + k * sizeof(int), sizeof(x));
						close(x);
					}
			return n;
		}
		if (t >= deadline)
			return -ETIMEDOUT;
		poll(&p, 1, (int)(deadline - t));
	}
}

bool dh_raw_hangup(int fd, int ms, int *status)
{
	uint64_t deadline = dh_now_ms() + (uint64_t)ms;
	char buf[MOE_MSG_MAX + 64];

	if (status)
		*status = 1;
	for (;;) {
		uint64_t t = dh_now_ms();
		ssize_t n = dh_raw_recv(fd, buf, sizeof(buf),
					t < deadline ? (int)(deadline - t) : 0);
		struct moe_msg_hdr h;
		int type;

		if (n == 0)
			return true;
		if (n < 0)
			return false;
		type = moe_msg_peek(buf, (size_t)n, &h);
		if (status && *status == 1) {
			if (type == MOE_MSG_HELLO_REPLY) {
				struct moe_msg_hello_reply r;

				if (!moe_msg_decode_hello_reply(buf, (size_t)n, &r))
					*status = r.status;
			} else if (type == MOE_MSG_ERROR) {
				struct moe_msg_error e;

				if (!moe_msg_decode_error(buf, (size_t)n, &e))
					*status = e.status;
			}
		}
	}
}

long dh_rss_kib(pid_t pid)
{
	char path[64], line[256];
	long kib = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "VmRSS:", 6))
			kib = strtol(line + 6, NULL, 10);
	fclose(f);
	assert_true(kib > 0);
	return kib;
}

struct daemon *dh_fixture_daemon(const char *cfg_extra, const char *env, int ready_ms)
{
	struct daemon *d = dh_daemon_new(DH_FIXTURE, false, ready_ms);

	d->socket_arg = true;
	if (cfg_extra)
		dh_daemon_write_cfg(d, cfg_extra);
	if (env)
		dh_daemon_env(d, "%s", env);
	dh_daemon_start(d);
	return d;
}

moe_client *dh_cl_open_with(struct daemon *d, const moe_connect_options *base)
{
	char eb[256] = "";
	moe_connect_options o = *base;
	moe_client *c = NULL;
	int r;

	o.errbuf = eb;
	o.errbuf_len = sizeof(eb);
	r = moe_connect_opts(d->sock, &o, &c);
	if (r)
		fail_msg("moe_connect_opts: %s (%s)", moe_strerror(r), eb);
	dh_cl_track(c);
	return c;
}

moe_client *dh_cl_open_named(struct daemon *d, const char *name)
{
	moe_connect_options o = {.name = name};

	return dh_cl_open_with(d, &o);
}

/* ------------------------------------------------------------------------ */
/* Clients under load: a loop, in a thread or in processes                  */

void *dh_load_loop(void *arg)
{
	struct dh_loader *L = arg;
	moe_connect_options o = {.name = "epoch-load"};
	struct moe_rng rng = {1000 + (uint64_t)L->id};
	moe_client *c;

	if (moe_connect_opts(L->d->sock, &o, &c)) {
		snprintf(L->why, sizeof(L->why), "cannot connect");
		L->failed++;
		return NULL;
	}
	while (!atomic_load(L->stop)) {
		uint32_t n = 1 + (uint32_t)(moe_rng_next(&rng) % 12);
		uint32_t layer = g_model->layers[moe_rng_next(&rng) % g_model->n_moe_layers].index;
		int dt = moe_rng_next(&rng) % 2 ? MOE_DTYPE_F32 : MOE_DTYPE_BF16;
		size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
		void *in = dh_make_input(dt, n, moe_rng_next(&rng)), *ref = malloc(bytes);
		void *bi = moe_buf_alloc(c, bytes), *bo = moe_buf_alloc(c, bytes);
		moe_completion done;
		uint64_t tag;
		int got = 0;

		if (!bi || !bo || !ref || moe_submit(c, layer, (moe_dtype)dt, memcpy(bi, in, bytes),
						     bo, n, 0, &tag)) {
			snprintf(L->why, sizeof(L->why), "submit failed");
			L->failed++;
			break;
		}
		for (uint64_t t0 = dh_now_ms(); !got && dh_now_ms() - t0 < DH_WAIT_MS;)
			if (!(got = moe_poll(c, &done, 1) == 1))
				usleep(50);
		L->requests++;
		if (!got || done.tag != tag || done.status) {
			snprintf(L->why, sizeof(L->why), "request %llu: %s",
				 (unsigned long long)L->requests,
				 got ? moe_strerror(done.status) : "no completion");
			L->failed++;
		} else {
			dh_ref_forward(layer, dt, in, ref, n);
			if (memcmp(ref, bo, bytes))
				L->wrong++;
			if (done.epoch < L->last_epoch)
				L->not_monotone++;
			if (done.epoch != L->last_epoch)
				L->epochs_seen++;
			if (!L->first_epoch)
				L->first_epoch = done.epoch;
			L->last_epoch = done.epoch;
		}
		moe_buf_free(c, bi);
		moe_buf_free(c, bo);
		free(in);
		free(ref);
	}
	moe_disconnect(c);
	return NULL;
}

struct dh_loaders {
	atomic_bool stop;
	int n;
	pid_t pid[DH_MAX_LOADERS];
	struct dh_loader L[DH_MAX_LOADERS];
};

struct dh_loaders *dh_loaders_start(struct daemon *d, int n, int id0)
{
	struct dh_loaders *h = mmap(NULL, sizeof(*h), PROT_READ | PROT_WRITE,
				    MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	assert_true(h != MAP_FAILED);
	assert_true(n > 0 && n <= DH_MAX_LOADERS);
	atomic_init(&h->stop, false);
	h->n = n;
	fflush(stdout);
	fflush(stderr);
	for (int i = 0; i < n; i++) {
		h->L[i] = (struct dh_loader){.d = d, .stop = &h->stop, .id = id0 + i};
		pid_t pid = fork(); /* (h is shared: only the parent writes pid[]) */

		assert_true(pid >= 0);
		if (!pid) {
			dh_load_loop(&h->L[i]);
			_exit(0);
		}
		h->pid[i] = pid;
	}
	return h;
}

uint64_t dh_loaders_stop(struct dh_loaders *h)
{
	uint64_t total = 0;

	atomic_store(&h->stop, true);
	for (int i = 0; i < h->n; i++) {
		struct dh_loader *L = &h->L[i];
		int ws;

		assert_int_equal(waitpid(h->pid[i], &ws, 0), h->pid[i]);
		assert_true(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
		printf("client process %d: %llu requests, %llu failed, %llu wrong, epochs %u..%u%s%s\n",
		       i, (unsigned long long)L->requests, (unsigned long long)L->failed,
		       (unsigned long long)L->wrong, L->first_epoch, L->last_epoch,
		       L->why[0] ? ": " : "", L->why);
		assert_int_equal(L->failed, 0);
		assert_int_equal(L->wrong, 0);
		assert_int_equal(L->not_monotone, 0);
		assert_true(L->requests > 0);
		total += L->requests;
	}
	munmap(h, sizeof(*h));
	return total;
}
