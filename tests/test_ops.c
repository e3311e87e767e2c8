/* tests/test_ops.c — moed as operators and systemd see it: sd_notify
 * (readiness, status, watchdog, reload, stop), configuration reload (SIGHUP
 * and `moectl reload-config`), drain / undrain, authorization with dropped
 * privileges, the handshake timeout, socket activation.
 *
 * Every test starts its own moed (MOE_BIN_DIR/moed) from a configuration
 * file in a fresh temporary directory, with its stderr in a file there
 * (printed when the test fails, with every sd_notify message received), and
 * stops it with SIGTERM, checking exit code 0.
 *
 * sd_notify: the test binds an AF_UNIX SOCK_DGRAM socket and starts moed
 * with NOTIFY_SOCKET naming it; each datagram is one sd_notify() call
 * (newline-separated assignments).
 *
 * Timing: no assertion is on wall time. The watchdog check counts
 * WATCHDOG=1 messages between two marks (a request sent, its completion)
 * while the engine is wedged (MOED_TEST_STALL_MS) for many times the ping
 * interval. Every wait is bounded; a bound that passes is a failure.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/daemon_harness.h"
#include "tests/testutil.h"

#include "client/include/moeclient.h"
#include "daemon/engine/engine.h"
#include "daemon/engine/model.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"
#include "kernels/cpu/convert.h"
#include "tools/synth.h"

#define MOED	DH_MOED
#define MOECTL	"" MOE_BIN_DIR "/moectl"
#define FIXTURE DH_FIXTURE
#define SOCKET_ACTIVATE "/usr/bin/systemd-socket-activate"

/* Bounds for waits that must not hang (generous: sanitizer builds are slow). */
#define READY_MS 20000
#define EXIT_MS	 DH_EXIT_MS
#define WAIT_MS	 DH_WAIT_MS

/* The watchdog test: pings every WATCHDOG_USEC / 2; a wedged batch sleeps
 * STALL_MS, i.e. 5 watchdog intervals, 10 ping intervals. */
#define WATCHDOG_USEC 400000
#define STALL_MS      2000

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static uint64_t now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

/* ------------------------------------------------------------------------ */
/* The in-process reference                                                 */

static int group_setup(void **state)
{
	signal(SIGPIPE, SIG_IGN);
	return dh_group_setup(state);
}

/* n tokens of N(0,1) fp32 hidden states (malloc'd). */
static float *make_input(uint32_t n, uint64_t seed)
{
	return dh_make_input(MOE_DTYPE_F32, n, seed);
}

/* out must be exactly what the in-process engine gives for in (fp32). */
static void check_output(uint32_t layer, const float *in, const float *out, uint32_t n,
			 const char *what)
{
	size_t cnt = (size_t)n * g_H;
	float *ref = malloc(cnt * sizeof(float));

	assert_non_null(ref);
	dh_ref_forward(layer, MOE_DTYPE_F32, in, ref, n);
	if (memcmp(ref, out, cnt * sizeof(float))) {
		size_t i = 0;

		while (i < cnt && !memcmp(&ref[i], &out[i], sizeof(float)))
			i++;
		fail_msg("%s: layer %u, %u tokens: element %zu is %.9g, the in-process engine "
			 "gives %.9g", what, layer, n, i, (double)out[i], (double)ref[i]);
	}
	free(ref);
}

/* ------------------------------------------------------------------------ */
/* Daemons                                                                  */

/* The server: section with our socket, then `server_extra` (more server
 * keys, indented) and `other` (other sections). */
static char *cfg_text(const struct daemon *d, const char *server_extra, const char *other)
{
	char *t;

	assert_true(asprintf(&t, "server:\n  socket: %s\n%s%s", d->sock,
			     server_extra ? server_extra : "", other ? other : "") > 0);
	return t;
}

static void daemon_set_cfg(struct daemon *d, const char *server_extra, const char *other)
{
	char *t = cfg_text(d, server_extra, other);

	dh_daemon_write_cfg(d, t);
	free(t);
}

/* A daemon on FIXTURE from a configuration file (cfg_text), with an
 * sd_notify socket or not. Not started yet. */
static struct daemon *daemon_new(const char *server_extra, const char *other, bool notify)
{
	struct daemon *d = dh_daemon_new(FIXTURE, notify, READY_MS);

	daemon_set_cfg(d, server_extra, other);
	return d;
}

/* ---- sd_notify ---------------------------------------------------------- */

/* The next datagram (NUL-terminated in buf), or false after `ms`. */
static bool notify_next(struct daemon *d, char *buf, size_t cap, int ms)
{
	uint64_t deadline = dh_now_ms() + (uint64_t)(ms < 0 ? 0 : ms);

	assert_true(d->nfd >= 0);
	for (;;) {
		ssize_t n = recv(d->nfd, buf, cap - 1, MSG_DONTWAIT);
		struct pollfd p = {d->nfd, POLLIN, 0};
		uint64_t t;

		if (n >= 0) {
			char *nn;

			buf[n] = '\0';
			nn = realloc(d->notes, d->notes_len + (size_t)n + 4);
			assert_non_null(nn);
			d->notes = nn;
			memcpy(d->notes + d->notes_len, "  > ", 4);
			memcpy(d->notes + d->notes_len + 4, buf, (size_t)n);
			d->notes_len += (size_t)n + 4;
			/* one line per message in the dump */
			for (size_t i = d->notes_len - (size_t)n; i < d->notes_len; i++)
				if (d->notes[i] == '\n')
					d->notes[i] = '|';
			nn = realloc(d->notes, d->notes_len + 2);
			assert_non_null(nn);
			d->notes = nn;
			d->notes[d->notes_len++] = '\n';
			d->notes[d->notes_len] = '\0';
			return true;
		}
		assert_true(errno == EAGAIN || errno == EINTR);
		t = dh_now_ms();
		if (t >= deadline)
			return false;
		poll(&p, 1, (int)(deadline - t));
	}
}

/* The value of assignment `name` (e.g. "STATUS") in a datagram, or NULL;
 * copied into val. */
static const char *note_get(const char *msg, const char *name, char *val, size_t cap)
{
	size_t k = strlen(name);

	for (const char *p = msg; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
		if (!strncmp(p, name, k) && p[k] == '=') {
			const char *e = strchr(p, '\n');
			size_t len = e ? (size_t)(e - p - (long)k - 1) : strlen(p + k + 1);

			if (len >= cap)
				len = cap - 1;
			memcpy(val, p + k + 1, len);
			val[len] = '\0';
			return val;
		}
	}
	return NULL;
}

static bool note_is(const char *msg, const char *name, const char *value)
{
	char v[512];

	return note_get(msg, name, v, sizeof(v)) && !strcmp(v, value);
}

static void note_count(struct daemon *d, const char *msg)
{
	if (note_is(msg, "WATCHDOG", "1"))
		d->n_watchdog++;
}

/* Reads datagrams until one assigns name=value (value NULL: any value);
 * copies it into out. Fails after `ms`. */
static void notify_expect(struct daemon *d, const char *name, const char *value, char *out,
			  size_t cap, int ms, const char *what)
{
	uint64_t deadline = dh_now_ms() + (uint64_t)ms;
	char buf[4096], v[512];

	for (;;) {
		uint64_t t = dh_now_ms();

		if (!notify_next(d, buf, sizeof(buf), t < deadline ? (int)(deadline - t) : 0))
			fail_msg("%s: no %s=%s from moed within %d ms", what, name,
				 value ? value : "...", ms);
		note_count(d, buf);
		if (note_get(buf, name, v, sizeof(v)) && (!value || !strcmp(v, value))) {
			if (out)
				snprintf(out, cap, "%s", buf);
			return;
		}
	}
}

/* Reads what is queued now; returns how many WATCHDOG=1 were among it. */
static uint64_t notify_flush(struct daemon *d)
{
	char buf[4096];
	uint64_t before = d->n_watchdog;

	while (notify_next(d, buf, sizeof(buf), 0))
		note_count(d, buf);
	return d->n_watchdog - before;
}

/* Waits until `n` more WATCHDOG=1 arrive. */
static void notify_pings(struct daemon *d, uint64_t n, const char *what)
{
	uint64_t want = d->n_watchdog + n, deadline = dh_now_ms() + READY_MS;
	char buf[4096];

	while (d->n_watchdog < want) {
		uint64_t t = dh_now_ms();

		if (t >= deadline || !notify_next(d, buf, sizeof(buf), (int)(deadline - t)))
			fail_msg("%s: %llu of %llu WATCHDOG=1 pings within %d ms", what,
				 (unsigned long long)(n - (want - d->n_watchdog)),
				 (unsigned long long)n, READY_MS);
		note_count(d, buf);
	}
}

/* ---- file descriptors --------------------------------------------------- */

static void fds_back_to(struct daemon *d, int fds0, const char *what)
{
	uint64_t deadline = dh_now_ms() + READY_MS;

	while (dh_count_fds(d->pid) != fds0 && dh_now_ms() < deadline)
		dh_nap_ms(5);
	if (dh_count_fds(d->pid) != fds0)
		fail_msg("%s: moed holds %d fds, %d before", what, dh_count_fds(d->pid), fds0);
}

/* ------------------------------------------------------------------------ */
/* Clients                                                                  */

/* 0 and *out, or the error (no failure). */
static int cl_try(const char *sock, const char *name, moe_client **out, char *eb, size_t ebn)
{
	moe_connect_options o = {.name = name, .errbuf = eb, .errbuf_len = ebn,
				 .region_bytes = 4u << 20};
	int r;

	*out = NULL;
	r = moe_connect_opts(sock, &o, out);
	if (!r)
		dh_cl_track(*out);
	return r;
}

static moe_client *cl_open(const char *sock, const char *name)
{
	char eb[256] = "";
	moe_client *c;
	int r = cl_try(sock, name, &c, eb, sizeof(eb));

	if (r)
		fail_msg("moe_connect_opts(%s): %s (%s)", sock, moe_strerror(r), eb);
	return c;
}

/* moe_forward of fresh random fp32 tokens; 0 with the output checked bit
 * for bit, or the error. */
static int forward(moe_client *c, uint32_t layer, uint32_t n, uint64_t seed, const char *what)
{
	float *in = make_input(n, seed), *out = malloc((size_t)n * g_H * sizeof(float));
	int r;

	assert_non_null(out);
	r = moe_forward(c, layer, MOE_DTYPE_F32, in, out, n);
	if (!r)
		check_output(layer, in, out, n, what);
	free(in);
	free(out);
	return r;
}

static void forward_ok(moe_client *c, uint32_t layer, uint32_t n, uint64_t seed, const char *what)
{
	int r = forward(c, layer, n, seed, what);

	if (r)
		fail_msg("%s: moe_forward(layer %u, %u tokens): %s", what, layer, n,
			 moe_strerror(r));
}

/* An fp32 request on buffers of the data area, no deadline. */
static void req_submit(moe_client *c, struct req *q, uint32_t layer, uint32_t n, uint64_t seed)
{
	dh_req_submit(c, q, layer, MOE_DTYPE_F32, n, seed, 0);
}

/* ---- status JSON -------------------------------------------------------- */

static cJSON *status(moe_client *c)
{
	return dh_status(c, false);
}

/* requests.<key> of the status JSON. */
static double req_stat(moe_client *c, const char *key)
{
	cJSON *j = status(c);
	double v = dh_jnum(dh_jget(j, "requests", cJSON_Object), key);

	cJSON_Delete(j);
	return v;
}

static char *state_of(moe_client *c, double *pending)
{
	cJSON *j = status(c);
	char *s = strdup(dh_jget(j, "state", cJSON_String)->valuestring);

	if (pending)
		*pending = dh_jnum(dh_jget(j, "queue", cJSON_Object), "pending_requests");
	cJSON_Delete(j);
	return s;
}

/* ---- moectl ------------------------------------------------------------- */

/* Runs `moectl -s SOCK args`; returns its exit code, *out its stdout and
 * stderr (malloc'd). */
static int moectl(struct daemon *d, const char *args, char **out)
{
	char *cmd, buf[1024];
	size_t len = 0;
	FILE *p;
	int st;

	assert_true(asprintf(&cmd, "%s -s %s %s 2>&1", MOECTL, d->sock, args) > 0);
	fflush(stdout);
	p = popen(cmd, "r");
	assert_non_null(p);
	*out = calloc(1, 1);
	assert_non_null(*out);
	while (fgets(buf, sizeof(buf), p)) {
		char *nn = realloc(*out, len + strlen(buf) + 1);

		assert_non_null(nn);
		*out = nn;
		memcpy(*out + len, buf, strlen(buf) + 1);
		len += strlen(buf);
	}
	st = pclose(p);
	printf("$ moectl %s -> %d: %s", args, WIFEXITED(st) ? WEXITSTATUS(st) : -1,
	       len ? *out : "(nothing)\n");
	free(cmd);
	assert_true(WIFEXITED(st));
	return WEXITSTATUS(st);
}

/* ------------------------------------------------------------------------ */
/* a. sd_notify: readiness, status, watchdog                                */

static void test_notify_watchdog(void **state)
{
	struct daemon *d = daemon_new(NULL, NULL, true);
	char msg[4096], st_line[512], backend[64];
	uint64_t during, n_extend = 0;
	moe_client *c;
	cJSON *j;
	int st;

	(void)state;
	dh_daemon_env(d, "WATCHDOG_USEC=%d", WATCHDOG_USEC);
	dh_daemon_env(d, "MOED_TEST_STALL_MS=%d", STALL_MS);
	dh_daemon_start(d);
	/* loading: EXTEND_TIMEOUT_USEC (one per MoE layer), then READY=1 */
	for (;;) {
		uint64_t t0 = dh_now_ms();

		if (!notify_next(d, msg, sizeof(msg), READY_MS))
			fail_msg("no READY=1 within %d ms", READY_MS);
		assert_true(dh_now_ms() - t0 <= READY_MS);
		note_count(d, msg);
		if (note_get(msg, "EXTEND_TIMEOUT_USEC", st_line, sizeof(st_line))) {
			assert_true(strtoull(st_line, NULL, 10) > 0);
			assert_non_null(note_get(msg, "STATUS", st_line, sizeof(st_line)));
			assert_non_null(strstr(st_line, "loading"));
			n_extend++;
		}
		if (note_is(msg, "READY", "1"))
			break;
	}
	printf("%llu EXTEND_TIMEOUT_USEC messages before READY=1\n", (unsigned long long)n_extend);
	assert_int_equal(n_extend, g_model->n_moe_layers);
	/* the status line: family and backend */
	notify_expect(d, "STATUS", NULL, msg, sizeof(msg), READY_MS, "status line");
	note_get(msg, "STATUS", st_line, sizeof(st_line));
	printf("STATUS=%s\n", st_line);
	c = cl_open(d->sock, "test_ops");
	j = status(c);
	snprintf(backend, sizeof(backend), "%s",
		 dh_jget(dh_jget(j, "backend", cJSON_Object), "name", cJSON_String)->valuestring);
	cJSON_Delete(j);
	assert_non_null(strstr(st_line, "serving"));
	assert_non_null(strstr(st_line, "qwen2_moe"));
	if (!strstr(st_line, backend))
		fail_msg("STATUS=%s does not name the backend \"%s\"", st_line, backend);

	/* idle: pings keep coming */
	notify_pings(d, 3, "idle");
	/* a wedged batch: no ping while it runs */
	notify_flush(d);
	forward_ok(c, 0, 5, 1, "a request in a stalled batch");
	during = notify_flush(d);
	printf("WATCHDOG=1 pings between sending a request and its completion, the batch "
	       "stalled %d ms, pinging every %d ms when idle: %llu\n",
	       STALL_MS, WATCHDOG_USEC / 2000, (unsigned long long)during);
	/* at most one as the loop takes the request, one as it comes back
	 * (the marks are not exact); unwedged there would be ~10 */
	if (during > 2)
		fail_msg("%llu WATCHDOG=1 pings arrived while a batch stalled: the watchdog "
			 "does not see a wedged engine", (unsigned long long)during);
	notify_pings(d, 3, "after the stalled batch");
	dh_expect_alive(d, "a stalled batch");

	dh_cl_close(c);
	assert_int_equal(kill(d->pid, SIGTERM), 0);
	notify_expect(d, "STOPPING", "1", NULL, 0, EXIT_MS, "SIGTERM");
	st = dh_daemon_wait_exit(d, EXIT_MS);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* a. sd_notify: configuration reload                                       */

/* SIGHUP; expects RELOADING=1 with a plausible MONOTONIC_USEC, then READY=1;
 * returns the READY datagram in out. */
static void sighup_reload(struct daemon *d, char *out, size_t cap, const char *what)
{
	char msg[4096], v[64];
	uint64_t t0 = now_us(), t1, mono;

	notify_flush(d);
	assert_int_equal(kill(d->pid, SIGHUP), 0);
	notify_expect(d, "RELOADING", "1", msg, sizeof(msg), READY_MS, what);
	t1 = now_us();
	if (!note_get(msg, "MONOTONIC_USEC", v, sizeof(v)))
		fail_msg("%s: RELOADING=1 without MONOTONIC_USEC in the same message: %s", what,
			 msg);
	mono = strtoull(v, NULL, 10);
	/* the same clock as ours (CLOCK_MONOTONIC), read between our marks */
	if (mono < t0 || mono > t1)
		fail_msg("%s: MONOTONIC_USEC=%llu is not CLOCK_MONOTONIC between %llu and %llu",
			 what, (unsigned long long)mono, (unsigned long long)t0,
			 (unsigned long long)t1);
	notify_expect(d, "READY", "1", out, cap, READY_MS, what);
}

static void test_notify_reload(void **state)
{
	struct daemon *d = daemon_new("  max_clients: 8\n", "scheduler:\n  request_timeout_ms: 30000\n",
				      true);
	char msg[4096], v[512];
	moe_client *c;
	int st;

	(void)state;
	dh_daemon_start(d);
	notify_expect(d, "READY", "1", NULL, 0, READY_MS, "start");
	c = cl_open(d->sock, "test_ops");
	forward_ok(c, 0, 3, 10, "before any reload");
	assert_int_equal(req_stat(c, "config_reloads"), 0);
	assert_int_equal(req_stat(c, "config_reloads_refused"), 0);

	/* a valid, changed configuration */
	daemon_set_cfg(d, "  max_clients: 7\n", "scheduler:\n  request_timeout_ms: 12345\n");
	sighup_reload(d, msg, sizeof(msg), "SIGHUP with a valid configuration");
	if (note_get(msg, "STATUS", v, sizeof(v)) && strstr(v, "refused"))
		fail_msg("a valid configuration was refused: %s", v);
	assert_int_equal(req_stat(c, "config_reloads"), 1);
	assert_int_equal(req_stat(c, "config_reloads_refused"), 0);
	forward_ok(c, 2, 4, 11, "after a reload");

	/* a broken file: refused, the daemon serves on */
	dh_daemon_write_cfg(d, "server: [unclosed\n");
	sighup_reload(d, msg, sizeof(msg), "SIGHUP with a syntax error");
	if (!note_get(msg, "STATUS", v, sizeof(v)))
		fail_msg("a refused reload: READY=1 without a STATUS= saying why: %s", msg);
	printf("refused reload: STATUS=%s\n", v);
	assert_non_null(strstr(v, "reload refused"));
	assert_non_null(strstr(v, "moe.yaml")); /* FILE:LINE:COLUMN of the error */
	dh_expect_alive(d, "a broken configuration");
	forward_ok(c, 0, 6, 12, "after a refused reload");
	assert_int_equal(req_stat(c, "config_reloads"), 1);
	assert_int_equal(req_stat(c, "config_reloads_refused"), 1);
	{
		char *s = state_of(c, NULL);

		assert_string_equal(s, "serving");
		free(s);
	}
	/* valid YAML, invalid configuration: refused too */
	{
		char *t = cfg_text(d, "  max_clients: 0\n", NULL);

		dh_daemon_write_cfg(d, t);
		free(t);
	}
	sighup_reload(d, msg, sizeof(msg), "SIGHUP with max_clients 0");
	assert_non_null(note_get(msg, "STATUS", v, sizeof(v)));
	assert_non_null(strstr(v, "reload refused"));
	/* an admin group that does not exist */
	{
		char *t = cfg_text(d, "  admin_group: no-such-group-moe-test\n", NULL);

		dh_daemon_write_cfg(d, t);
		free(t);
	}
	sighup_reload(d, msg, sizeof(msg), "SIGHUP with an unknown admin group");
	assert_non_null(note_get(msg, "STATUS", v, sizeof(v)));
	assert_non_null(strstr(v, "reload refused"));
	assert_non_null(strstr(v, "no-such-group-moe-test"));
	/* the same through moe_admin: refused with the reason */
	{
		char why[256];
		int r = moe_admin(c, 3, 0, WAIT_MS, why, sizeof(why));

		printf("moe_admin(reload) of a bad file: %s: %s\n", moe_strerror(r), why);
		assert_int_equal(r, MOE_EINVAL);
		assert_non_null(strstr(why, "no-such-group-moe-test"));
	}
	assert_int_equal(req_stat(c, "config_reloads"), 1);
	assert_int_equal(req_stat(c, "config_reloads_refused"), 4);
	forward_ok(c, 2, 1, 13, "after four refused reloads");
	/* and a good one again */
	daemon_set_cfg(d, "  max_clients: 8\n", NULL);
	sighup_reload(d, msg, sizeof(msg), "SIGHUP with a valid configuration again");
	assert_int_equal(req_stat(c, "config_reloads"), 2);

	dh_cl_close(c);
	assert_int_equal(kill(d->pid, SIGTERM), 0);
	notify_expect(d, "STOPPING", "1", NULL, 0, EXIT_MS, "SIGTERM");
	st = dh_daemon_wait_exit(d, EXIT_MS);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* b. Reloaded limits are in force                                          */

static void admin_reload(moe_client *c, char *msg, size_t n)
{
	int r = moe_admin(c, 3, 0, WAIT_MS, msg, n);

	printf("reload: %s\n", msg);
	if (r)
		fail_msg("moe_admin(reload-config): %s: %s", moe_strerror(r), msg);
}

/* A changed model.path at a configuration reload: READY=1 once the file is
 * accepted, then the weights roll in from the new path while serving (the
 * same fixture copied elsewhere: same outputs, a new source and version). */
static void test_notify_model_path(void **state)
{
	struct daemon *d = daemon_new(NULL, NULL, true);
	char msg[4096], v[512], copy[600], cmd[1400];
	moe_client *c;
	cJSON *j = NULL, *w = NULL, *l;
	double done = 0;

	(void)state;
	dh_daemon_start(d);
	notify_expect(d, "READY", "1", NULL, 0, READY_MS, "start");
	c = cl_open(d->sock, "test_ops");
	forward_ok(c, 0, 3, 20, "before the new model.path");
	snprintf(copy, sizeof(copy), "%s/model-copy", d->dir);
	snprintf(cmd, sizeof(cmd), "cp -r '%s' '%s'", FIXTURE, copy);
	assert_int_equal(system(cmd), 0);
	free(d->model);
	d->model = strdup(copy);
	daemon_set_cfg(d, NULL, NULL);
	sighup_reload(d, msg, sizeof(msg), "SIGHUP with a new model.path");
	if (note_get(msg, "STATUS", v, sizeof(v)) && strstr(v, "refused"))
		fail_msg("a new model.path was refused: %s", v);
	for (uint64_t t0 = dh_now_ms(); dh_now_ms() - t0 < DH_WAIT_MS && done < 1; dh_nap_ms(20)) {
		cJSON_Delete(j);
		j = dh_status(c, true);
		w = dh_jget(j, "weights", cJSON_Object);
		done = dh_jnum(w, "reloads_done");
		assert_int_equal(dh_jnum(w, "reloads_failed"), 0);
	}
	assert_true(done == 1);
	cJSON_ArrayForEach(l, dh_jget(w, "layers", cJSON_Array)) {
		assert_int_equal(dh_jnum(l, "version"), 2);
		assert_int_equal(dh_jnum(l, "source"), 1);
	}
	l = cJSON_GetArrayItem(dh_jget(w, "sources", cJSON_Array), 1);
	assert_string_equal(dh_jget(l, "path", cJSON_String)->valuestring, copy);
	cJSON_Delete(j);
	forward_ok(c, 2, 5, 21, "after the reload from the new model.path");
	dh_daemon_stop(d);
	g_passed = true;
}

static void test_reload_limits(void **state)
{
	/* the old handshake timeout: the longest there is */
	struct daemon *d = daemon_new("  max_clients: 8\n  handshake_timeout_ms: 600000\n",
				      "cpu:\n  threads: 2\n", false);
	moe_client *c1, *c2;
	moe_model_info mi;
	char msg[256], eb[256];
	int r, s, st, fds0;

	(void)state;
	dh_daemon_start(d);
	c1 = cl_open(d->sock, "first");
	forward_ok(c1, 0, 3, 20, "before the reload");
	fds0 = dh_count_fds(d->pid);
	/* a connection that never says HELLO is kept (600 s) ... */
	s = dh_raw_socket(d->sock);
	assert_true(s >= 0);
	{
		/* accepted (not still in the backlog when the reload lands) */
		uint64_t deadline = dh_now_ms() + READY_MS;

		for (;;) {
			cJSON *j = status(c1);
			int n = cJSON_GetArraySize(dh_jget(j, "clients", cJSON_Array));

			cJSON_Delete(j);
			if (n == 2)
				break;
			if (dh_now_ms() > deadline)
				fail_msg("the daemon did not accept a connection");
			dh_nap_ms(2);
		}
	}

	daemon_set_cfg(d,
		       "  max_clients: 1\n  handshake_timeout_ms: 200\n"
		       "  max_inflight_requests: 3\n",
#ifdef MOE_HAVE_CUDA
		       "cpu:\n  threads: 1\ndevices: [0]\n");
#else
		       "cpu:\n  threads: 1\n");
#endif
	admin_reload(c1, msg, sizeof(msg));
	assert_non_null(strstr(msg, "applied"));
	assert_non_null(strstr(msg, "needs a restart"));
	assert_non_null(strstr(msg, "cpu.threads"));
#ifdef MOE_HAVE_CUDA
	/* another device is never switched to under load */
	assert_non_null(strstr(msg, "devices"));
#endif
	/* ... until the new 200 ms apply */
	if (!dh_raw_hangup(s, READY_MS, &st))
		fail_msg("a connection without HELLO was not dropped after handshake_timeout_ms "
			 "was reloaded to 200");
	close(s);
	assert_int_equal(st, MOE_EPROTO);
	/* max_clients 1: a second client is refused, the first works */
	r = cl_try(d->sock, "second", &c2, eb, sizeof(eb));
	printf("second client with max_clients 1: %s (%s)\n", moe_strerror(r), eb);
	assert_int_equal(r, MOE_ELIMIT);
	s = dh_raw_socket(d->sock);
	assert_true(s >= 0);
	assert_true(dh_raw_hangup(s, READY_MS, &st));
	close(s);
	assert_int_equal(st, MOE_ELIMIT);
	forward_ok(c1, 2, 5, 21, "the first client while a second is refused");
	assert_true(req_stat(c1, "refused_clients") >= 2);
	/* the first client's handshake had the old limits; a new one the new */
	assert_int_equal(moe_get_model_info(c1, &mi), 0);
	assert_int_equal(mi.max_inflight_requests, 256);

	daemon_set_cfg(d, "  max_clients: 2\n  max_inflight_requests: 3\n", "cpu:\n  threads: 1\n");
	admin_reload(c1, msg, sizeof(msg));
	c2 = cl_open(d->sock, "second");
	assert_int_equal(moe_get_model_info(c2, &mi), 0);
	assert_int_equal(mi.max_inflight_requests, 3);
	forward_ok(c2, 0, 7, 22, "a client admitted after max_clients went up");
	forward_ok(c1, 0, 2, 23, "the first client");
	assert_int_equal(req_stat(c1, "config_reloads"), 2);
	dh_cl_close(c2);
	fds_back_to(d, fds0, "after the reloads");
	dh_cl_close(c1);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* c. Drain                                                                 */

struct admin_call {
	moe_client *c;
	uint32_t op, flags;
	int ret;
	char msg[256];
	atomic_int done;
};

static void *admin_thread(void *arg)
{
	struct admin_call *a = arg;

	a->ret = moe_admin(a->c, a->op, a->flags, WAIT_MS, a->msg, sizeof(a->msg));
	atomic_store(&a->done, 1);
	return NULL;
}

#define DRAIN_REQS 8
#define DRAIN_STALL_MS 250

static void test_drain(void **state)
{
	/* 16-token batches, each stalled: 8 queued requests take 8 batches */
	struct daemon *d = daemon_new(NULL, "scheduler:\n  max_batch_tokens: 16\n", false);
	moe_client *a, *b, *obs;
	struct req q[DRAIN_REQS];
	struct admin_call call = {0};
	pthread_t th;
	double pending = 0;
	char *s, *out;
	int rc;

	(void)state;
	dh_daemon_env(d, "MOED_TEST_STALL_MS=%d", DRAIN_STALL_MS);
	dh_daemon_start(d);
	a = cl_open(d->sock, "submitter");
	b = cl_open(d->sock, "admin");
	obs = cl_open(d->sock, "observer");

	/* all of them in the ring when the daemon next looks */
	dh_daemon_freeze(d);
	for (int i = 0; i < DRAIN_REQS; i++)
		req_submit(a, &q[i], i % 2 ? 2 : 0, 16, 100 + (uint64_t)i);
	dh_daemon_thaw(d);
	{
		uint64_t deadline = dh_now_ms() + READY_MS;

		/* the daemon has taken them (status is answered between batches) */
		for (;;) {
			s = state_of(obs, &pending);
			free(s);
			if (pending > 0)
				break;
			if (dh_now_ms() > deadline)
				fail_msg("the daemon never had requests queued");
			dh_nap_ms(1);
		}
	}
	printf("%.0f requests queued when the drain was sent\n", pending);
	call.c = b;
	call.op = 1;
	call.flags = 1;
	assert_int_equal(pthread_create(&th, NULL, admin_thread, &call), 0);
	{
		uint64_t deadline = dh_now_ms() + READY_MS;

		for (;;) {
			s = state_of(obs, &pending);
			if (!strcmp(s, "draining")) {
				free(s);
				break;
			}
			free(s);
			if (dh_now_ms() > deadline) {
				pthread_join(th, NULL);
				fail_msg("status never said \"draining\"");
			}
			dh_nap_ms(1);
		}
	}
	printf("draining with %.0f requests queued; drain --wait %s\n", pending,
	       atomic_load(&call.done) ? "already answered" : "not answered yet");
	/* new requests are refused meanwhile */
	rc = forward(a, 0, 2, 130, "during a drain");
	assert_int_equal(rc, MOE_ESHUTDOWN);
	rc = forward(obs, 2, 1, 131, "during a drain");
	assert_int_equal(rc, MOE_ESHUTDOWN);
	assert_int_equal(pthread_join(th, NULL), 0);
	printf("drain --wait: %s: %s\n", moe_strerror(call.ret), call.msg);
	assert_int_equal(call.ret, 0);
	/* when it answered, every queued request had completed, correctly */
	assert_int_equal(moe_poll(a, NULL, 0), 0);
	for (int i = 0; i < DRAIN_REQS; i++) {
		int st = 12345, r = moe_wait(a, q[i].tag, 0, &st);

		if (r)
			fail_msg("request %d not complete when drain --wait answered: %s", i,
				 moe_strerror(r));
		assert_int_equal(st, 0);
		check_output(q[i].layer, q[i].copy, q[i].out, q[i].n, "a request queued before a drain");
		dh_req_free(a, &q[i]);
	}
	s = state_of(obs, &pending);
	assert_string_equal(s, "draining");
	assert_int_equal(pending, 0);
	free(s);
	/* undrain: requests work again */
	{
		char msg[256];

		assert_int_equal(moe_admin(b, 2, 0, WAIT_MS, msg, sizeof(msg)), 0);
		printf("undrain: %s\n", msg);
	}
	s = state_of(obs, NULL);
	assert_string_equal(s, "serving");
	free(s);
	forward_ok(a, 0, 3, 132, "after undrain");

	/* the same with moectl */
	rc = moectl(d, "drain --wait", &out);
	assert_int_equal(rc, 0);
	assert_non_null(strstr(out, "drain"));
	free(out);
	s = state_of(obs, NULL);
	assert_string_equal(s, "draining");
	free(s);
	assert_int_equal(forward(a, 2, 1, 133, "after moectl drain"), MOE_ESHUTDOWN);
	rc = moectl(d, "undrain", &out);
	assert_int_equal(rc, 0);
	assert_non_null(strstr(out, "accepting"));
	free(out);
	forward_ok(a, 2, 1, 134, "after moectl undrain");
	rc = moectl(d, "reload-config --wait", &out);
	assert_int_equal(rc, 0);
	assert_non_null(strstr(out, "applied"));
	free(out);
	assert_int_equal(req_stat(obs, "config_reloads"), 1);
	dh_daemon_write_cfg(d, "scheduler: {max_batch_tokens: }\n  bad: [\n");
	rc = moectl(d, "reload-config", &out);
	assert_true(rc != 0);
	assert_non_null(strstr(out, "moe.yaml"));
	free(out);
	assert_int_equal(req_stat(obs, "config_reloads_refused"), 1);
	forward_ok(a, 0, 2, 135, "after a refused moectl reload-config");

	dh_cl_close(a);
	dh_cl_close(b);
	dh_cl_close(obs);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* d. Authorization with dropped privileges                                 */

struct child_result {
	int connect, forward, admin, status, trace;
	char err[256];
	float out[4 * 88];
};

#define AUTH_TOKENS 4

/* In a child: drop to uid/gid/groups, then connect, forward, admin. */
static void as_user(struct daemon *d, uid_t uid, gid_t gid, size_t ngroups, const gid_t *groups,
		    const float *in, struct child_result *res)
{
	uint64_t deadline;
	pid_t pid;
	int st;

	memset(res, 0, sizeof(*res));
	res->connect = res->forward = res->admin = res->status = res->trace = 1;
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		moe_connect_options o = {.name = "unprivileged", .errbuf = res->err,
					 .errbuf_len = sizeof(res->err), .region_bytes = 1u << 20};
		moe_client *c = NULL;
		char msg[256];

		if (setgroups(ngroups, groups) || setgid(gid) || setuid(uid))
			_exit(10);
		if (getuid() != uid || geteuid() != uid || getegid() != gid)
			_exit(11);
		res->connect = moe_connect_opts(d->sock, &o, &c);
		if (!res->connect) {
			char *j = NULL;

			res->forward = moe_forward(c, 0, MOE_DTYPE_F32, in, res->out, AUTH_TOKENS);
			res->admin = moe_admin(c, 2 /* undrain: harmless */, 0, 10000, msg,
					       sizeof(msg));
			res->status = moe_status_json(c, &j, NULL);
			free(j);
			/* a trace shows every client's requests: administrators only */
			res->trace = moe_trace_start(c, &(struct moe_admin_trace){
							.layer = MOE_ADMIN_ALL_LAYERS});
			moe_disconnect(c);
		}
		_exit(0);
	}
	deadline = dh_now_ms() + WAIT_MS;
	for (;;) {
		pid_t w = waitpid(pid, &st, WNOHANG);

		if (w == pid)
			break;
		if (dh_now_ms() > deadline) {
			kill(pid, SIGKILL);
			waitpid(pid, &st, 0);
			fail_msg("the unprivileged child did not finish");
		}
		dh_nap_ms(2);
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		fail_msg("the unprivileged child failed: wait status 0x%x", st);
}

static void test_auth_privileges(void **state)
{
	struct passwd *nobody;
	struct group *g;
	gid_t sock_gid = 0, nobody_gid;
	uid_t nobody_uid;
	char *extra, sock_group[64], admin_group[64], msg[256];
	struct daemon *d;
	struct child_result *res;
	float *in;
	moe_client *root;
	double refused;
	int n_refused = 0;

	(void)state;
	if (geteuid() != 0) {
		printf("test_auth_privileges: SKIPPED (needs root to drop privileges)\n");
		skip();
	}
	nobody = getpwnam("nobody");
	nobody_uid = nobody ? nobody->pw_uid : 65534;
	nobody_gid = nobody ? nobody->pw_gid : 65534;
	/* the admin group: root's; the socket's group: another, not nobody's */
	g = getgrgid(0);
	assert_non_null(g);
	snprintf(admin_group, sizeof(admin_group), "%s", g->gr_name);
	setgrent();
	sock_group[0] = '\0';
	while ((g = getgrent())) {
		if (g->gr_gid != 0 && g->gr_gid != nobody_gid && g->gr_gid != 65534 &&
		    g->gr_gid < 60000) {
			sock_gid = g->gr_gid;
			snprintf(sock_group, sizeof(sock_group), "%s", g->gr_name);
			break;
		}
	}
	endgrent();
	if (!sock_group[0]) {
		printf("test_auth_privileges: SKIPPED (no spare group in /etc/group)\n");
		skip();
	}
	printf("socket group %s (%d), admin group %s (0), nobody %d:%d\n", sock_group,
	       (int)sock_gid, admin_group, (int)nobody_uid, (int)nobody_gid);
	assert_true(asprintf(&extra, "  socket_mode: 0666\n  group: %s\n  admin_group: %s\n",
			     sock_group, admin_group) > 0);
	d = daemon_new(extra, NULL, false);
	free(extra);
	assert_int_equal(chmod(d->dir, 0755), 0); /* nobody may reach the socket */
	dh_daemon_start(d);
	{
		struct stat sb;

		assert_int_equal(stat(d->sock, &sb), 0);
		assert_int_equal(sb.st_mode & 0777, 0666);
		assert_int_equal(sb.st_gid, sock_gid);
	}
	res = mmap(NULL, sizeof(*res), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	assert_true(res != MAP_FAILED);
	assert_int_equal(g_H * AUTH_TOKENS, sizeof(res->out) / sizeof(float));
	in = make_input(AUTH_TOKENS, 40);

	/* nobody: not root, not the daemon's user, not in the socket's group */
	as_user(d, nobody_uid, nobody_gid, 0, NULL, in, res);
	printf("nobody: connect %s (%s)\n", moe_strerror(res->connect), res->err);
	assert_int_equal(res->connect, MOE_EPERM);
	n_refused++;

	/* root: everything */
	root = cl_open(d->sock, "root");
	forward_ok(root, 0, 3, 41, "root");
	assert_int_equal(moe_admin(root, 2, 0, WAIT_MS, msg, sizeof(msg)), 0);

	/* nobody with the socket's group as its primary group: forward, no admin */
	as_user(d, nobody_uid, sock_gid, 0, NULL, in, res);
	printf("uid nobody, gid %s: connect %s, forward %s, admin %s\n", sock_group,
	       moe_strerror(res->connect), moe_strerror(res->forward), moe_strerror(res->admin));
	assert_int_equal(res->connect, 0);
	assert_int_equal(res->forward, 0);
	check_output(0, in, res->out, AUTH_TOKENS, "uid nobody in the socket's group");
	assert_int_equal(res->status, 0);
	assert_int_equal(res->admin, MOE_EPERM);
	assert_int_equal(res->trace, MOE_EPERM);
	n_refused += 2;

	/* ... as a supplementary group */
	{
		gid_t sup[1] = {sock_gid};

		as_user(d, nobody_uid, nobody_gid, 1, sup, in, res);
		printf("uid nobody, supplementary %s: connect %s, forward %s, admin %s\n",
		       sock_group, moe_strerror(res->connect), moe_strerror(res->forward),
		       moe_strerror(res->admin));
		assert_int_equal(res->connect, 0);
		assert_int_equal(res->forward, 0);
		check_output(0, in, res->out, AUTH_TOKENS, "supplementary socket group");
		assert_int_equal(res->admin, MOE_EPERM);
		assert_int_equal(res->trace, MOE_EPERM);
		n_refused += 2;
	}
	/* ... and in the admin group too: admin allowed */
	{
		gid_t sup[2] = {sock_gid, 0};

		as_user(d, nobody_uid, nobody_gid, 2, sup, in, res);
		printf("uid nobody, supplementary %s and %s: connect %s, forward %s, admin %s\n",
		       sock_group, admin_group, moe_strerror(res->connect),
		       moe_strerror(res->forward), moe_strerror(res->admin));
		assert_int_equal(res->connect, 0);
		assert_int_equal(res->forward, 0);
		assert_int_equal(res->admin, 0);
		assert_int_equal(res->trace, 0);
	}
	/* in the admin group only: the handshake needs forward rights (an
	 * administrator must also be in the socket's group) */
	as_user(d, nobody_uid, 0, 0, NULL, in, res);
	printf("uid nobody, gid %s only: connect %s\n", admin_group, moe_strerror(res->connect));
	if (res->connect == MOE_EPERM)
		n_refused++;
	else
		assert_int_equal(res->connect, 0);

	refused = req_stat(root, "refused_unauthorized");
	printf("refused_unauthorized: %.0f (expected %d)\n", refused, n_refused);
	assert_int_equal(refused, n_refused);
	forward_ok(root, 2, 2, 42, "root after the refusals");
	dh_expect_alive(d, "unprivileged clients");
	free(in);
	munmap(res, sizeof(*res));
	dh_cl_close(root);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* e. Handshake timeout                                                     */

static void test_handshake_timeout(void **state)
{
	struct daemon *d = daemon_new("  handshake_timeout_ms: 200\n", NULL, false);
	moe_client *good;
	int s[8], st, fds0;

	(void)state;
	dh_daemon_start(d);
	good = cl_open(d->sock, "good");
	forward_ok(good, 0, 3, 50, "before");
	fds0 = dh_count_fds(d->pid);
	for (int i = 0; i < 8; i++) {
		s[i] = dh_raw_socket(d->sock);
		assert_true(s[i] >= 0);
	}
	for (int i = 0; i < 8; i++) {
		if (!dh_raw_hangup(s[i], READY_MS, &st))
			fail_msg("connection %d, which never sent HELLO, was not dropped", i);
		close(s[i]);
		if (st != MOE_EPROTO && st != 1)
			fail_msg("connection %d dropped with status %d", i, st);
	}
	printf("8 silent connections dropped (status %s)\n", st == 1 ? "none" : moe_strerror(st));
	/* the attached client, idle far longer than 200 ms by now, is kept */
	forward_ok(good, 2, 4, 51, "an attached client after the timeouts");
	/* a new client still gets in */
	{
		moe_client *c2 = cl_open(d->sock, "late");

		forward_ok(c2, 0, 1, 52, "a client connecting after the timeouts");
		dh_cl_close(c2);
	}
	fds_back_to(d, fds0, "after the silent connections");
	dh_cl_close(good);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* f. Socket activation                                                     */

static void test_socket_activation(void **state)
{
	struct daemon *d;
	char *argv[10], *path;
	moe_client *c = NULL;
	char eb[256] = "";
	uint64_t deadline;
	struct stat sb;
	int r;

	(void)state;
	if (access(SOCKET_ACTIVATE, X_OK)) {
		printf("test_socket_activation: SKIPPED (%s not found)\n", SOCKET_ACTIVATE);
		skip();
	}
	d = daemon_new(NULL, NULL, false);
	assert_true(asprintf(&path, "%s/activated.sock", d->dir) > 0);
	argv[0] = SOCKET_ACTIVATE;
	argv[1] = "--seqpacket";
	argv[2] = "-l";
	argv[3] = path;
	argv[4] = MOED;
	argv[5] = "--model";
	argv[6] = FIXTURE;
	argv[7] = NULL;
	d->argv = argv;
	dh_daemon_spawn(d);
	deadline = dh_now_ms() + READY_MS;
	while (stat(path, &sb)) {
		if (dh_now_ms() > deadline)
			fail_msg("%s did not create %s", SOCKET_ACTIVATE, path);
		dh_expect_alive(d, "starting systemd-socket-activate");
		dh_nap_ms(5);
	}
	/* the first connection starts moed on the passed socket; moe_connect
	 * waits (bounded) for the handshake meanwhile */
	for (;;) {
		r = cl_try(path, "activated", &c, eb, sizeof(eb));
		if (!r)
			break;
		if (dh_now_ms() > deadline)
			fail_msg("no connection on the activated socket: %s (%s)", moe_strerror(r),
				 eb);
		dh_expect_alive(d, "a connection to the activated socket");
		dh_nap_ms(20);
	}
	forward_ok(c, 0, 9, 60, "on the activated socket");
	forward_ok(c, 2, 2, 61, "on the activated socket");
	{
		cJSON *j = status(c);

		assert_string_equal(dh_jget(j, "state", cJSON_String)->valuestring, "serving");
		cJSON_Delete(j);
	}
	dh_cl_close(c);
	{
		/* moed itself, in place of the activator (same pid) */
		char exe[64], target[512];
		ssize_t n;

		snprintf(exe, sizeof(exe), "/proc/%d/exe", (int)d->pid);
		n = readlink(exe, target, sizeof(target) - 1);
		assert_true(n > 0);
		target[n] = '\0';
		printf("pid %d runs %s\n", (int)d->pid, target);
		assert_non_null(strstr(target, "moed"));
	}
	dh_daemon_stop(d);
	/* moed did not remove the socket it was given */
	assert_int_equal(stat(path, &sb), 0);
	{
		FILE *f = fopen(d->log, "r");
		char line[512];
		bool said = false;

		assert_non_null(f);
		while (fgets(line, sizeof(line), f))
			if (strstr(line, "the socket systemd passed"))
				said = true;
		fclose(f);
		assert_true(said);
	}
	free(path);
	g_passed = true;
}

/* ------------------------------------------------------------------------ */
/* A lost device: crash-only                                                */

/* A sticky device error is not survived in place. The engine's fault hook
 * (MOED_TEST_ENGINE_FAULT, the same path a lost GPU takes) fails the 3rd
 * batch: that batch's requests and every queued one are answered
 * MOE_EDEVICE, moed exits with status 3 for systemd to restart it, and the
 * client's next call fails at once instead of hanging. */
static void test_device_lost(void **state)
{
	struct daemon *d = daemon_new(NULL, NULL, false);
	struct req q[8];
	moe_client *c;
	int st, n_dev = 0;

	(void)state;
	dh_daemon_env(d, "MOED_TEST_ENGINE_FAULT=3");
	dh_daemon_start(d);
	c = cl_open(d->sock, "victim");
	forward_ok(c, 0, 3, 300, "batch 1, before the fault");
	forward_ok(c, 2, 2, 301, "batch 2, before the fault");
	/* all in the ring when the daemon next looks: layer 0 ones form the
	 * failing batch, layer 2 ones are still queued behind it */
	dh_daemon_freeze(d);
	for (int i = 0; i < 8; i++)
		req_submit(c, &q[i], i % 2 ? 2 : 0, 4, 310 + (uint64_t)i);
	dh_daemon_thaw(d);
	for (int i = 0; i < 8; i++) {
		int r = moe_wait(c, q[i].tag, DH_WAIT_MS, &st);

		if (r)
			fail_msg("request %d: moe_wait: %s", i, moe_strerror(r));
		if (st != MOE_EDEVICE && st != MOE_EDAEMON)
			fail_msg("request %d completed with %s, not MOE_EDEVICE", i,
				 moe_strerror(st));
		n_dev += st == MOE_EDEVICE;
		dh_req_free(c, &q[i]);
	}
	printf("%d of 8 requests answered MOE_EDEVICE by the daemon\n", n_dev);
	/* the batch that failed and the queue behind it were answered, not
	 * dropped: at least the failing batch saw its completions */
	assert_true(n_dev >= 1);
	st = dh_daemon_wait_exit(d, DH_EXIT_MS);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 3)
		fail_msg("moed's wait status after a lost device: 0x%x (want exit 3)", st);
	{
		int r = forward(c, 0, 1, 320, "after the daemon exited");

		assert_int_equal(r, MOE_EDAEMON);
	}
	{
		FILE *f = fopen(d->log, "r");
		char line[1024];
		bool seen = false;

		assert_non_null(f);
		while (fgets(line, sizeof(line), f))
			seen |= strstr(line, "device lost") && strstr(line, "MOED_TEST_ENGINE_FAULT");
		fclose(f);
		assert_true(seen);
	}
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_notify_watchdog, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_notify_reload, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_notify_model_path, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_reload_limits, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_drain, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_auth_privileges, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_handshake_timeout, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_socket_activation, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_device_lost, dh_setup, dh_teardown),
	};

	if (access(MOED, X_OK)) {
		printf("test_ops: SKIPPED, %s is not built\n", MOED);
		return 77;
	}
	return cmocka_run_group_tests(tests, group_setup, dh_group_teardown);
}
