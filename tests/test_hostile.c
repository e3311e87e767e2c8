/* tests/test_hostile.c — the standing adversarial suite: one moed, one
 * well-behaved victim, and one case per class of attack a local process can
 * make, each speaking the wire by hand (tests/wire.h), not libmoeclient.
 *
 * Throughout, a victim thread (libmoeclient) sends forward requests and
 * compares every output bit for bit with the in-process engine; each case
 * must leave it completing requests with no wrong answer, and must leave
 * moed's open fds where they were and its RSS within a bound. A defect
 * found later gets a case here.
 *
 * Cases (docs/SECURITY.md has the threat model):
 *   empty_fds      empty datagrams carrying memfds, no HELLO (fd leak)
 *   hugetlb        a sealed MFD_HUGETLB region (SIGBUS on a punched page)
 *   starvation     16 newer clients keep their rings full; an older one
 *                  must keep its share
 *   status_flood   56 clients send STATUS and never read the replies
 *   total_shm      regions past server.max_total_shm_bytes
 *   log_flood      refused HELLOs and admin commands from unauthorized uids
 *   bad_entries    malformed entries, span and offset edges
 *   bad_rings      ring indices that lie
 *   bad_regions    region size, seal and header edges
 *   churn          connect / HELLO / hang up, over and over
 *   cancel_flood   CANCELs of tags that do not exist
 *   stopped        a client stopped (SIGSTOP) with work queued while moed
 *                  gets SIGTERM (last: it stops moed, which must exit 0)
 *
 * No assertion is on wall time; every wait is bounded.
 */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/daemon_harness.h"
#include "tests/testutil.h"
#include "tests/wire.h"

#include "client/include/moeclient.h"
#include "daemon/engine/engine.h"
#include "kernels/cpu/convert.h"
#include "tools/synth.h"

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

#define MAX_QUEUE   32	       /* scheduler.max_queue_requests: small, so the flood fills it */
#define TOTAL_SHM   (48u << 20) /* server.max_total_shm_bytes */
#define VICTIM_SHM  (4u << 20)
#define RAW_BYTES   (256u << 10)
/* moed's RSS may grow by this much in a case. Under AddressSanitizer (moed
 * is built with the same flags as this test) freed memory is not reused at
 * once: it sits in ASan's quarantine (256 MiB by default), so a case that
 * churns the heap (56 clients flooding STATUS: one JSON tree per loop
 * iteration, ~120 KiB with redzones) shows as growth there and not in a
 * plain build. Leaks are LeakSanitizer's to find, at moed's exit. */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_SLACK_KIB (160 * 1024)
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RSS_SLACK_KIB (160 * 1024)
#endif
#endif
#ifndef RSS_SLACK_KIB
#define RSS_SLACK_KIB (32 * 1024)
#endif

static struct daemon *g_d;
/* --attack: the cases against a moed started elsewhere (tools/soak.sh),
 * without the victim thread (the soak's clients are the victims) */
static bool g_attack;
static int g_cases_ok; /* cases that ran to their end: moed's log is shown unless all did */

static int count_lines(const char *file, const char *a, const char *b);

/* ---- the victim --------------------------------------------------------- */

static struct {
	pthread_t th;
	moe_client *c;
	atomic_bool stop;
	atomic_ulong done, wrong, failed;
	char why[MOE_ERRLEN + 64];
} g_v;

/* Requests of 1-9 tokens on both MoE layers of the fixture, f32 and bf16,
 * each checked against the in-process engine (no cmocka in a thread: the
 * counters say what went wrong, the main thread asserts). */
static void *victim_main(void *arg)
{
	struct moe_rng r = {4242};
	uint32_t layers[2] = {g_model->layers[0].index,
			      g_model->layers[g_model->n_moe_layers - 1].index};

	(void)arg;
	for (uint64_t k = 0; !atomic_load(&g_v.stop); k++) {
		uint32_t n = 1 + (uint32_t)(moe_rng_next(&r) % 9), L = layers[k % 2];
		int dt = k % 3 == 0 ? MOE_DTYPE_BF16 : MOE_DTYPE_F32;
		size_t cnt = (size_t)n * g_H, bytes = cnt * dh_dt_size(dt);
		float *f = malloc(cnt * 4);
		void *in = malloc(bytes), *out = malloc(bytes), *ref = malloc(bytes);
		struct moe_epoch *ep;
		char err[MOE_ERRLEN];
		int rc;

		for (size_t i = 0; i < cnt; i++)
			f[i] = (float)moe_rng_normal(&r);
		moe_cpu_from_f32(dt == MOE_DTYPE_F32 ? MOE_DT_F32 : MOE_DT_BF16, f, in, cnt);
		rc = moe_forward(g_v.c, L, (moe_dtype)dt, in, out, n);
		ep = moe_epoch_acquire(g_eng);
		{
			struct moe_batch b = {L, n, (enum moe_dtype)dt, in, ref, NULL, NULL, 0, NULL, NULL};

			if (moe_engine_forward(g_eng, ep, &b, err))
				snprintf(g_v.why, sizeof(g_v.why), "reference: %s", err);
		}
		moe_epoch_release(ep);
		if (rc) {
			snprintf(g_v.why, sizeof(g_v.why), "moe_forward: %s", moe_strerror(rc));
			atomic_fetch_add(&g_v.failed, 1);
		} else if (memcmp(out, ref, bytes)) {
			snprintf(g_v.why, sizeof(g_v.why), "layer %u, %u tokens: output differs", L, n);
			atomic_fetch_add(&g_v.wrong, 1);
		} else {
			atomic_fetch_add(&g_v.done, 1);
		}
		free(f), free(in), free(out), free(ref);
	}
	return NULL;
}

/* The victim completes `n` more requests (bounded wait), all right so far. */
static void victim_progress(const char *during, unsigned long n)
{
	unsigned long want = atomic_load(&g_v.done) + n;
	uint64_t until = dh_now_ms() + DH_WAIT_MS;

	if (g_attack)
		return;
	while (atomic_load(&g_v.done) < want && !atomic_load(&g_v.failed) &&
	       !atomic_load(&g_v.wrong) && dh_now_ms() < until)
		dh_nap_ms(2);
	if (atomic_load(&g_v.failed) || atomic_load(&g_v.wrong))
		fail_msg("%s: the victim got %lu failed and %lu wrong answers (%s)", during,
			 atomic_load(&g_v.failed), atomic_load(&g_v.wrong), g_v.why);
	if (atomic_load(&g_v.done) < want)
		fail_msg("%s: the victim completed %lu of %lu requests in %d ms", during,
			 n - (want - atomic_load(&g_v.done)), n, DH_WAIT_MS);
}

/* ---- moed's resources --------------------------------------------------- */

struct watch {
	int fds, fds_ns; /* moed_fds(); fds that are not sockets */
	long rss;
};

static void alive(const char *when)
{
	if (g_attack && kill(g_d->pid, 0))
		fail_msg("moed (pid %d) is gone, %s", (int)g_d->pid, when);
	dh_expect_alive(g_d, when);
}

static cJSON *status_now(void);

/* moed's open fds less its connections (each holds one socket): what must
 * come back after a case, even while other clients come and go (soak) */
static int fds_less_clients(void)
{
	cJSON *j = status_now(); /* its connection is open while we count */
	int fds = dh_count_fds(g_d->pid);
	int n = cJSON_GetArraySize(dh_jget(j, "clients", cJSON_Array));

	cJSON_Delete(j);
	return fds - n;
}

/* --attack, with other clients coming and going all the time: moed's fds
 * that are not sockets (what a client can hand over: memfds, pipes), less
 * the status snapshot it may hold for a moment */
static int fds_not_sockets(void)
{
	char dir[64], path[400], link[256];
	struct dirent *e;
	DIR *d;
	int n = 0;

	snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)g_d->pid);
	d = opendir(dir);
	assert_non_null(d);
	while ((e = readdir(d))) {
		ssize_t k;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		k = readlink(path, link, sizeof(link) - 1);
		if (k <= 0)
			continue;
		link[k] = 0;
		n += strncmp(link, "socket:", 7) && !strstr(link, "moed-status");
	}
	closedir(d);
	return n;
}

static int moed_fds(void)
{
	return g_attack ? fds_not_sockets() : fds_less_clients();
}

static struct watch watch_start(void)
{
	alive("at the case's start");
	return (struct watch){moed_fds(), fds_not_sockets(), dh_rss_kib(g_d->pid)};
}

/* moed's fds come back to where they were once the attackers are gone
 * (bounded wait: moed drops them on its next loop iterations), its RSS
 * grew by at most RSS_SLACK_KIB, and the victim still completes requests. */
static void watch_end(const struct watch *w, const char *what)
{
	uint64_t until = dh_now_ms() + DH_WAIT_MS;
	int fds;
	long rss;

	victim_progress(what, 20);
	while (((fds = moed_fds()) > w->fds || fds_not_sockets() > w->fds_ns) &&
	       dh_now_ms() < until)
		dh_nap_ms(10);
	rss = dh_rss_kib(g_d->pid);
	printf("%-13s moed fds (less one per client) %d -> %d, RSS %ld -> %ld KiB; victim %lu "
	       "requests right so far\n",
	       what, w->fds, fds, w->rss, rss, atomic_load(&g_v.done));
	if (fds > w->fds)
		fail_msg("%s: moed holds %d fds, %d before", what, fds, w->fds);
	if (fds_not_sockets() > w->fds_ns)
		fail_msg("%s: moed holds %d fds that are not sockets, %d before", what,
			 fds_not_sockets(), w->fds_ns);
	if (rss > w->rss + RSS_SLACK_KIB)
		fail_msg("%s: moed's RSS grew from %ld to %ld KiB", what, w->rss, rss);
	alive(what);
	g_cases_ok++;
}

#define STATUS_SHM (1u << 20)

/* moed's status JSON, read through a short-lived libmoeclient connection of
 * its own with a STATUS_SHM region (the victim's stays busy). */
static cJSON *status_now(void)
{
	moe_connect_options o = {.region_bytes = STATUS_SHM, .name = "status"};
	moe_client *c = NULL;
	cJSON *j;
	int r = moe_connect_opts(g_d->sock, &o, &c);

	if (r)
		fail_msg("status connection: %s", moe_strerror(r));
	j = dh_status(c, true);
	moe_disconnect(c);
	return j;
}

static double control(const cJSON *j, const char *key)
{
	return dh_jnum(dh_jget(j, "control", cJSON_Object), key);
}

/* ---- suite setup -------------------------------------------------------- */

static int suite_setup(void **state)
{
	char extra[512];
	moe_connect_options o = {.region_bytes = VICTIM_SHM, .name = "victim"};
	int r;

	if (dh_group_setup(state))
		return -1;
	g_d = dh_daemon_new(DH_FIXTURE, false, 10000);
	g_d->socket_arg = true;
	snprintf(extra, sizeof(extra),
		 "scheduler:\n  max_queue_requests: %d\n  request_timeout_ms: 20000\n"
		 "server:\n  socket_mode: 0666\n  max_clients: 128\n  handshake_timeout_ms: 2000\n"
		 "  max_total_shm_bytes: %u\n",
		 MAX_QUEUE, TOTAL_SHM);
	dh_daemon_write_cfg(g_d, extra);
	dh_daemon_start(g_d);
	if (chmod(g_d->dir, 0755)) /* other uids may reach the socket */
		return -1;
	r = moe_connect_opts(g_d->sock, &o, &g_v.c);
	if (r) {
		fprintf(stderr, "victim: %s\n", moe_strerror(r));
		return -1;
	}
	return pthread_create(&g_v.th, NULL, victim_main, NULL) ? -1 : 0;
}

static int suite_teardown(void **state)
{
	atomic_store(&g_v.stop, true);
	pthread_join(g_v.th, NULL);
	printf("victim: %lu requests, every output bit for bit the in-process engine's; %lu "
	       "failed, %lu wrong\n",
	       atomic_load(&g_v.done), atomic_load(&g_v.failed), atomic_load(&g_v.wrong));
	moe_disconnect(g_v.c);
	wire_close_all();
	if (g_d && g_d->pid)
		dh_daemon_stop(g_d);
	g_passed = g_cases_ok == 12; /* else dh_reap_daemons shows moed's log */
	dh_reap_daemons();
	return dh_group_teardown(state);
}

static void flood_stop(void);
static void spam_stop(void);

static int case_teardown(void **state)
{
	(void)state;
	flood_stop(); /* a failed flood case's threads, before their clients go */
	spam_stop();
	wire_close_all();
	return 0;
}

/* ---- 1. empty datagrams with fds --------------------------------------- */

static void test_empty_fds(void **state)
{
	struct watch w;
	int s;

	(void)state;
	w = watch_start();
	/* 41 connections with one each (moed drops each after it), then one
	 * connection with 41 */
	for (int i = 0; i < 41; i++) {
		int fd = make_memfd(1 << 20, 0, 0);

		s = raw_connect(g_d);
		raw_sendmsg(s, "", 0, &fd, 1);
		close(fd);
		assert_true(dh_raw_hangup(s, DH_EXIT_MS, NULL));
		close(s);
	}
	s = raw_connect(g_d);
	for (int i = 0; i < 41; i++) {
		int fd = make_memfd(1 << 20, 0, 0);
		int e = raw_sendmsg(s, "", 0, &fd, 1);

		close(fd);
		if (e && e != -EPIPE && e != -ECONNRESET && e != -EAGAIN)
			fail_msg("send: %s", strerror(-e));
	}
	/* moed takes the first empty datagram as the end of the connection:
	 * it hangs up, and every fd that came with the datagrams is closed */
	assert_true(dh_raw_hangup(s, DH_EXIT_MS, NULL));
	close(s);
	watch_end(&w, "empty_fds");
}

/* ---- 2. a hugetlbfs region --------------------------------------------- */

static void test_hugetlb(void **state)
{
	struct watch w = watch_start();
	struct moe_msg_hello h;
	int fd, s, st;

	(void)state;
	fd = memfd_create("hostile-huge", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
	if (fd < 0) {
		printf("SKIPPED part: this kernel makes no MFD_HUGETLB memfd (%s)\n",
		       strerror(errno));
		watch_end(&w, "hugetlb");
		return;
	}
	/* sized and sealed with no huge page reserved: every check but the
	 * filesystem's passes */
	assert_int_equal(ftruncate(fd, 2 << 20), 0);
	assert_int_equal(fcntl(fd, F_ADD_SEALS, SEALS), 0);
	fill_hello(&h, 64, 2 << 20);
	s = raw_connect(g_d);
	assert_int_equal(raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), &fd, 1), 0);
	close(fd);
	st = expect_refused(s, "a hugetlbfs region");
	assert_int_equal(st, MOE_EINVAL);
	/* for the filesystem, not for a failed mmap (which needs no huge page
	 * free: on a host with some, the mapping works and the region would
	 * fault later) */
	if (g_d->log) /* (--attack: moed's log is not ours to read) */
		assert_true(count_lines(g_d->log, "refused", "not a plain shmem memfd") >= 1);
	watch_end(&w, "hugetlb");
}

/* ---- 3. starvation ------------------------------------------------------ */

struct flooder {
	struct raw *r;
	pthread_t th;
	atomic_bool stop;
	atomic_ulong done;
	uint32_t layer;
};

/* Keeps the ring full of 1-token requests and reaps completions; never
 * asserts (a thread), counts. */
static void *flood_main(void *arg)
{
	struct flooder *f = arg;
	struct raw *r = f->r;
	size_t bytes = (size_t)g_H * 4;
	uint64_t tag = 1;

	memset(r->data, 0x3c, 2 * bytes);
	while (!atomic_load(&f->stop)) {
		uint32_t head = atomic_load_explicit(&r->hdr->sq_head, memory_order_acquire);
		uint32_t tail = atomic_load_explicit(&r->hdr->cq_tail, memory_order_acquire);
		bool pushed = false;

		while (r->sq_tail - head < r->entries) {
			struct moe_sqe q = sqe(tag++, f->layer, 1, 0, bytes, MOE_DTYPE_F32);

			r->sq[r->sq_tail & (r->entries - 1)] = q;
			r->sq_tail++;
			pushed = true;
		}
		if (pushed) {
			atomic_store_explicit(&r->hdr->sq_tail, r->sq_tail, memory_order_release);
			raw_send(r->sock, MOE_MSG_DOORBELL, NULL, 0, NULL, 0);
		}
		if (tail - r->cq_head > r->entries)
			break; /* moed would not write that: stop counting */
		atomic_fetch_add(&f->done, tail - r->cq_head);
		r->cq_head = tail;
		atomic_store_explicit(&r->hdr->cq_head, r->cq_head, memory_order_release);
		{
			char buf[MOE_MSG_MAX];

			while (recv(r->sock, buf, sizeof(buf), MSG_DONTWAIT) > 0)
				;
		}
		usleep(100);
	}
	return NULL;
}

/* The flood cases' threads, global so that a failing case's teardown
 * stops them before their raw clients are closed. */
#define NF_STARVE 16
static struct flooder g_flood[NF_STARVE];
static bool g_flood_on;

static void flood_stop(void)
{
	if (!g_flood_on)
		return;
	for (int i = 0; i < NF_STARVE; i++)
		atomic_store(&g_flood[i].stop, true);
	for (int i = 0; i < NF_STARVE; i++)
		if (g_flood[i].th)
			pthread_join(g_flood[i].th, NULL);
	g_flood_on = false;
}

static void test_starvation(void **state)
{
	enum { NF = NF_STARVE, N = 40 };
	struct flooder *f = g_flood;
	struct watch w = watch_start();
	unsigned long flood = 0, v0;

	(void)state;
	/* the victim connected first: it is the oldest client, last in moed's
	 * list; the flooders are newer and fill the queue (MAX_QUEUE) */
	memset(g_flood, 0, sizeof(g_flood));
	g_flood_on = true;
	for (int i = 0; i < NF; i++) {
		f[i].r = raw_attach(g_d, RAW_BYTES, 64);
		f[i].layer = g_model->layers[i % g_model->n_moe_layers].index;
		assert_int_equal(pthread_create(&f[i].th, NULL, flood_main, &f[i]), 0);
	}
	for (uint64_t until = dh_now_ms() + DH_WAIT_MS;;) { /* the flood is on */
		unsigned long t = 0;

		for (int i = 0; i < NF; i++)
			t += atomic_load(&f[i].done);
		if (t >= 4 * MAX_QUEUE)
			break;
		if (dh_now_ms() > until)
			fail_msg("the flooders completed %lu requests in %d ms", t, DH_WAIT_MS);
		dh_nap_ms(1);
	}
	v0 = atomic_load(&g_v.done);
	victim_progress("16 clients flooding the queue", N);
	flood_stop();
	for (int i = 0; i < NF; i++) {
		flood += atomic_load(&f[i].done);
		raw_close(f[i].r);
	}
	printf("starvation: the victim completed %lu requests while 16 flooders completed %lu "
	       "(max_queue_requests %d)\n",
	       atomic_load(&g_v.done) - v0, flood, MAX_QUEUE);
	watch_end(&w, "starvation");
}

/* ---- 4. STATUS flood ---------------------------------------------------- */

struct spam {
	struct raw **f;
	int n;
	atomic_bool stop;
	atomic_ulong sent;
};

/* STATUS from every flooder as fast as their sockets take them; the
 * replies are never read. */
static void *spam_main(void *arg)
{
	struct spam *sp = arg;

	while (!atomic_load(&sp->stop)) {
		for (int i = 0; i < sp->n; i++)
			for (int k = 0; k < 8; k++)
				if (raw_send(sp->f[i]->sock, MOE_MSG_STATUS, NULL, 0, NULL, 0) == 0)
					atomic_fetch_add(&sp->sent, 1);
		usleep(200);
	}
	return NULL;
}

static struct spam g_spam;
static pthread_t g_spam_th;

static void spam_stop(void)
{
	if (!g_spam_th)
		return;
	atomic_store(&g_spam.stop, true);
	pthread_join(g_spam_th, NULL);
	g_spam_th = 0;
}

static void test_status_flood(void **state)
{
	enum { NF = 56, N = 100 };
	static struct raw *f[NF];
	struct spam *sp = &g_spam;
	struct watch w = watch_start();
	double loops, builds, served, batches;
	cJSON *j0, *j1;

	(void)state;
	for (int i = 0; i < NF; i++)
		f[i] = raw_attach(g_d, RAW_BYTES, 4);
	j0 = status_now();
	memset(sp, 0, sizeof(*sp));
	sp->f = f, sp->n = NF;
	assert_int_equal(pthread_create(&g_spam_th, NULL, spam_main, sp), 0);
	for (uint64_t until = dh_now_ms() + DH_WAIT_MS; atomic_load(&sp->sent) < 8 * NF;) {
		if (dh_now_ms() > until)
			fail_msg("%lu STATUS sent in %d ms", atomic_load(&sp->sent), DH_WAIT_MS);
		dh_nap_ms(1);
	}
	victim_progress("a STATUS flood", N);
	j1 = status_now();
	spam_stop();
	loops = control(j1, "loops") - control(j0, "loops");
	builds = control(j1, "status_builds") - control(j0, "status_builds");
	served = control(j1, "status_served") - control(j0, "status_served");
	batches = dh_jnum(dh_jget(j1, "requests", cJSON_Object), "batches") -
		  dh_jnum(dh_jget(j0, "requests", cJSON_Object), "batches");
	printf("status_flood: %lu STATUS sent by %d clients that never read; meanwhile the victim "
	       "completed %d requests, moed ran %.0f loop iterations and %.0f batches, built the "
	       "JSON %.0f times and sent %.0f replies\n",
	       atomic_load(&sp->sent), NF, N, loops, batches, builds, served);
	/* at most one snapshot per iteration and one more per batch collected
	 * (a status must count every completion its client can have seen, and
	 * the worker posts those before the loop collects the batch), at most 8
	 * messages per client per iteration, whatever the flood (before: one
	 * JSON and one memfd per STATUS, 64 per client per wake-up). Plus one
	 * for the window's edge: a snapshot counts the iteration that builds
	 * it (loops++ at the top) but not its own build (counted after), so
	 * j0's build is inside the difference and its iteration is not (CI
	 * saw builds = loops + batches + 1 once in ~40 runs). */
	assert_true(builds <= loops + batches + 1);
	assert_true(served <= 8.0 * (NF + 2) * loops);
	cJSON_Delete(j0);
	cJSON_Delete(j1);
	for (int i = 0; i < NF; i++)
		raw_close(f[i]);
	watch_end(&w, "status_flood");
}

/* ---- 5. all regions together -------------------------------------------- */

static void test_total_shm(void **state)
{
	struct raw *r[64];
	struct watch w = watch_start();
	cJSON *j = status_now();
	double used = control(j, "shm_bytes"), cap = control(j, "max_total_shm_bytes");
	int n = 0, fd, st;

	(void)state;
	cJSON_Delete(j);
	used -= STATUS_SHM;
	if (g_attack && cap - used > 48.0 * (1 << 20)) {
		printf("total_shm: %.0f MiB left under the cap: not filled in --attack\n",
		       (cap - used) / (1 << 20));
		watch_end(&w, "total_shm");
		return;
	}
	if (!g_attack) {
		assert_true(cap == TOTAL_SHM);
		/* the victim's region (and the status connection's) only */
		assert_true(used == VICTIM_SHM);
	}
	while (n < 64 && used + (double)(n + 1) * (1 << 20) <= cap)
		r[n++] = raw_attach(g_d, 1 << 20, 64);
	/* one more region passes the cap: refused, moed holds no more */
	fd = make_memfd(1 << 20, SEALS, 64);
	st = hello_refused(g_d, fd, 64, 1 << 20, "a region past max_total_shm_bytes");
	assert_int_equal(st, MOE_ELIMIT);
	raw_close(r[--n]);
	r[n] = raw_attach(g_d, 1 << 20, 64); /* room again once one went */
	n++;
	printf("total_shm: %d regions of 1 MiB beside the victim's %u MiB fill %u MiB; the next "
	       "one is refused (MOE_ELIMIT) until one goes\n",
	       n, VICTIM_SHM >> 20, TOTAL_SHM >> 20);
	while (n)
		raw_close(r[--n]);
	watch_end(&w, "total_shm");
}

/* ---- 6. refusals in the log --------------------------------------------- */

/* In a child that is uid `uid` (gid `gid`): `n` HELLOs (each on a new
 * connection) and, if attached, `admin` admin commands. Exits 0 when every
 * HELLO got `want` and every admin command MOE_EPERM. No cmocka here. */
static void child_as(uid_t uid, gid_t gid, const char *sock, int n, int want, int admin)
{
	if (setgroups(0, NULL) || setgid(gid) || setuid(uid))
		_exit(10);
	for (int i = 0; i < n; i++) {
		int st, s = child_hello(sock, RAW_BYTES, &st);

		if (s < 0)
			_exit(-s);
		if (st != want)
			_exit(14);
		for (int a = 0; !st && a < admin; a++) {
			int ast, r = child_admin(s, 7, MOE_ADMIN_UNDRAIN, NULL, 0, &ast);

			if (r)
				_exit(-r);
			if (ast != MOE_EPERM)
				_exit(16);
		}
		close(s);
	}
	_exit(0);
}

static void run_child(uid_t uid, gid_t gid, int n, int want, int admin)
{
	pid_t p = fork();
	int ws = 0;

	assert_true(p >= 0);
	if (p == 0)
		child_as(uid, gid, g_d->sock, n, want, admin);
	assert_int_equal(waitpid(p, &ws, 0), p);
	if (!WIFEXITED(ws) || WEXITSTATUS(ws))
		fail_msg("the uid %d child failed (wait status 0x%x)", (int)uid, ws);
}

static int count_lines(const char *file, const char *a, const char *b)
{
	char line[1024];
	FILE *f = fopen(file, "r");
	int n = 0;

	assert_non_null(f);
	while (fgets(line, sizeof(line), f))
		n += strstr(line, a) && strstr(line, b);
	fclose(f);
	return n;
}

static void test_log_flood(void **state)
{
	struct passwd *pw = getpwnam("nobody");
	uid_t uid = pw ? pw->pw_uid : 65534;
	gid_t gid = pw ? pw->pw_gid : 65534;
	struct watch w = watch_start();
	char who[32];
	double sup0, sup1;
	uint64_t t0;
	cJSON *j;
	int lines, windows;

	(void)state;
	if (geteuid() != 0) {
		printf("SKIPPED: log_flood needs root to act as another uid\n");
		return;
	}
	j = status_now();
	sup0 = control(j, "log_lines_suppressed");
	cJSON_Delete(j);
	/* 60 HELLOs of a uid that may not connect (not root, not moed's user,
	 * not in the socket's group), then 200 admin commands of the same uid
	 * with the socket's group (root's: it may forward, not administer) */
	t0 = dh_now_ms();
	run_child(uid, gid == 0 ? 65534 : gid, 60, MOE_EPERM, 0);
	run_child(uid, 0, 1, 0, 200);
	windows = 1 + (int)((dh_now_ms() - t0) / 10000); /* 5 lines per uid per 10 s */
	snprintf(who, sizeof(who), "uid %d", (int)uid);
	lines = count_lines(g_d->log, who, "refused");
	j = status_now();
	sup1 = control(j, "log_lines_suppressed");
	cJSON_Delete(j);
	printf("log_flood: 260 refusals of uid %d wrote %d log lines; %.0f suppressed\n", (int)uid,
	       lines, sup1 - sup0);
	assert_true(lines >= 1 && lines <= 5 * windows);
	assert_true(sup1 - sup0 >= 260 - 5 * windows);
	watch_end(&w, "log_flood");
}

/* ---- 7. malformed entries, spans and offsets ---------------------------- */

static void test_bad_entries(void **state)
{
	struct watch w = watch_start();
	struct raw *r = raw_attach(g_d, RAW_BYTES, 64);
	const uint64_t D = r->data_bytes, row = (uint64_t)g_H * 4;
	const uint32_t L = g_model->layers[0].index;
	struct moe_sqe q[] = {
		sqe(1, L, 1, 0, row, 7),				/* dtype */
		sqe(2, 1, 1, 0, row, MOE_DTYPE_F32),			/* a dense layer */
		sqe(3, 999, 1, 0, row, MOE_DTYPE_F32),		/* no such layer */
		sqe(4, L, 0, 0, row, MOE_DTYPE_F32),			/* no tokens */
		sqe(5, L, 1u << 30, 0, row, MOE_DTYPE_F32),		/* too many tokens */
		sqe(6, L, 1, 2, row, MOE_DTYPE_F32),			/* misaligned in */
		sqe(7, L, 1, 0, row + 1, MOE_DTYPE_F32),		/* misaligned out */
		sqe(8, L, 1, D, row, MOE_DTYPE_F32),			/* in past the end */
		sqe(9, L, 1, 0, D - row + 4, MOE_DTYPE_F32),		/* out across the end */
		sqe(10, L, 1, UINT64_MAX - 3, row, MOE_DTYPE_F32),	/* offset overflow */
		sqe(11, L, (uint32_t)(D / row) + 1, 0, 0, MOE_DTYPE_F32), /* span > area */
		sqe(12, L, 1, 0, row, MOE_DTYPE_F32),			/* bad flags */
		sqe(13, L, 1, 0, row, MOE_DTYPE_F32),			/* reserved set */
	};
	struct moe_cqe c[sizeof(q) / sizeof(q[0])];

	(void)state;
	q[11].flags = 0x80;
	q[12].route_off = 1; /* without MOE_SQE_ROUTING */
	for (size_t i = 0; i < sizeof(q) / sizeof(q[0]); i++)
		raw_push(r, &q[i]);
	raw_doorbell(r);
	raw_wait(r, c, sizeof(q) / sizeof(q[0]), false);
	for (size_t i = 0; i < sizeof(q) / sizeof(q[0]); i++)
		if (c[i].status >= 0)
			fail_msg("entry %llu was accepted (status %d)", (unsigned long long)c[i].tag,
				 c[i].status);
	raw_forward_ok(r, L, MOE_DTYPE_F32, 3, 77); /* the session goes on */
	raw_close(r);
	watch_end(&w, "bad_entries");
}

/* ---- 8. ring indices that lie ------------------------------------------- */

static void test_bad_rings(void **state)
{
	struct watch w = watch_start();
	struct raw *r;
	struct moe_cqe c;

	(void)state;
	/* a tail far past the head: dropped */
	r = raw_attach(g_d, RAW_BYTES, 16);
	atomic_store(&r->hdr->sq_tail, r->sq_tail + 1000);
	raw_doorbell(r);
	assert_true(dh_raw_hangup(r->sock, DH_EXIT_MS, NULL));
	raw_close(r);
	/* a tail that runs backwards: dropped */
	r = raw_attach(g_d, RAW_BYTES, 16);
	atomic_store(&r->hdr->sq_tail, r->sq_tail - 1);
	raw_doorbell(r);
	assert_true(dh_raw_hangup(r->sock, DH_EXIT_MS, NULL));
	raw_close(r);
	/* a completion head that claims more than moed wrote: dropped at the
	 * next completion */
	r = raw_attach(g_d, RAW_BYTES, 16);
	raw_forward_ok(r, g_model->layers[0].index, MOE_DTYPE_F32, 1, 5);
	atomic_store(&r->hdr->cq_head, r->cq_head + 5000);
	{
		struct moe_sqe q = sqe(99, g_model->layers[0].index, 1, 0, (uint64_t)g_H * 4,
				       MOE_DTYPE_F32);

		raw_push(r, &q);
		raw_doorbell(r);
	}
	assert_true(dh_raw_hangup(r->sock, DH_EXIT_MS, NULL));
	raw_close(r);
	/* the head written by the client (it is moed's): moed keeps its own
	 * copy, so the entry is still taken once, and answered right */
	r = raw_attach(g_d, RAW_BYTES, 16);
	atomic_store(&r->hdr->sq_head, 12345);
	{
		size_t bytes = (size_t)2 * g_H * 4;
		float *in = dh_make_input(MOE_DTYPE_F32, 2, 6);
		struct moe_sqe q = sqe(100, g_model->layers[0].index, 2, 0, bytes, MOE_DTYPE_F32);

		memcpy(r->data, in, bytes);
		r->sq[r->sq_tail++ & (r->entries - 1)] = q;
		atomic_store_explicit(&r->hdr->sq_tail, r->sq_tail, memory_order_release);
		raw_doorbell(r);
		raw_wait(r, &c, 1, false);
		assert_int_equal(c.tag, 100);
		assert_int_equal(c.status, 0);
		check_output(q.layer, MOE_DTYPE_F32, in, r->data + bytes, 2,
			     "after the client wrote moed's head");
		free(in);
	}
	raw_close(r);
	watch_end(&w, "bad_rings");
}

/* ---- 9. region edges ----------------------------------------------------- */

static void test_bad_regions(void **state)
{
	struct watch w = watch_start();
	struct moe_msg_hello h;
	int s, fds[2], p[2];

	(void)state;
	hello_refused(g_d, make_memfd(32 << 10, SEALS, 4), 4, 32 << 10, "a region under 64 KiB");
	hello_refused(g_d, make_memfd(2ull << 30, SEALS, 4), 4, 2ull << 30,
		      "a region over max_client_shm_bytes");
	hello_refused(g_d, make_memfd(1 << 20, SEALS, 4), 4, 2 << 20, "a size that is not the fd's");
	hello_refused(g_d, make_memfd(1 << 20, 0, 4), 4, 1 << 20, "an unsealed region");
	hello_refused(g_d, make_memfd(1 << 20, F_SEAL_SHRINK | F_SEAL_GROW, 4), 4, 1 << 20,
		      "a region that can still be sealed");
	hello_refused(g_d, make_memfd(1 << 20, SEALS, 0), 4, 1 << 20, "a region with no header");
	hello_refused(g_d, make_memfd(1 << 20, SEALS, 3), 3, 1 << 20, "3 ring entries");
	hello_refused(g_d, make_memfd(1 << 20, SEALS, 8192), 8192, 1 << 20, "8192 ring entries");
	hello_refused(g_d, -1, 4, 1 << 20, "a HELLO without a memfd");
	assert_int_equal(pipe(p), 0);
	close(p[1]);
	hello_refused(g_d, p[0], 4, 1 << 20, "a pipe for a region");
	/* two fds with one HELLO */
	fds[0] = make_memfd(1 << 20, SEALS, 4);
	fds[1] = make_memfd(1 << 20, SEALS, 4);
	fill_hello(&h, 4, 1 << 20);
	s = raw_connect(g_d);
	assert_int_equal(raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), fds, 2), 0);
	close(fds[0]);
	close(fds[1]);
	expect_refused(s, "two fds with a HELLO");
	/* something else first */
	s = raw_connect(g_d);
	assert_int_equal(raw_send(s, MOE_MSG_STATUS, NULL, 0, NULL, 0), 0);
	expect_refused(s, "STATUS before HELLO");
	watch_end(&w, "bad_regions");
}

/* ---- 10. churn ------------------------------------------------------------ */

static void test_churn(void **state)
{
	struct watch w = watch_start();

	(void)state;
	for (int i = 0; i < 150; i++) {
		struct raw *r = raw_attach(g_d, RAW_BYTES, 4);

		raw_close(r);
		close(raw_connect(g_d)); /* and hang up before any HELLO */
	}
	watch_end(&w, "churn");
}

/* ---- 11. CANCEL flood ----------------------------------------------------- */

static void test_cancel_flood(void **state)
{
	struct watch w = watch_start();
	struct raw *r = raw_attach(g_d, RAW_BYTES, 64);
	int sent = 0;

	(void)state;
	for (uint64_t t = 0; t < 5000; t++) {
		struct moe_msg_cancel m = {.tag = t * 7919};

		if (raw_send(r->sock, MOE_MSG_CANCEL, &m, sizeof(m), NULL, 0) == 0)
			sent++;
		else
			dh_nap_ms(1); /* its socket is full: moed reads 8 per loop */
	}
	raw_forward_ok(r, g_model->layers[0].index, MOE_DTYPE_F32, 4, 8);
	printf("cancel_flood: %d CANCELs of tags that do not exist\n", sent);
	raw_close(r);
	watch_end(&w, "cancel_flood");
}

/* ---- 12. a stopped client at SIGTERM -------------------------------------- */

static void test_stopped(void **state)
{
	pid_t p;
	int ws = 0;

	(void)state;
	victim_progress("before the stop", 5);
	p = fork();
	assert_true(p >= 0);
	if (p == 0) { /* attach, queue work, stop: never reads again */
		moe_client *c = NULL;
		moe_connect_options o = {.region_bytes = 1 << 20, .name = "stopped"};
		size_t bytes = (size_t)2 * g_H * 4;
		uint64_t tag;

		if (moe_connect_opts(g_d->sock, &o, &c))
			_exit(20);
		for (int i = 0; i < 4; i++) {
			float *in = moe_buf_alloc(c, bytes), *out = moe_buf_alloc(c, bytes);

			if (!in || !out)
				break;
			memset(in, 0, bytes);
			if (moe_submit(c, g_model->layers[0].index, MOE_DTYPE_F32, in, out, 2, 0,
				       &tag))
				break;
		}
		raise(SIGSTOP);
		_exit(0);
	}
	assert_int_equal(waitpid(p, &ws, WUNTRACED), p);
	assert_true(WIFSTOPPED(ws));
	/* moed drains and exits 0 with the stopped client attached */
	atomic_store(&g_v.stop, true);
	pthread_join(g_v.th, NULL);
	g_v.th = 0;
	dh_daemon_stop(g_d);
	kill(p, SIGKILL);
	waitpid(p, &ws, 0);
	printf("stopped: moed exited 0 on SIGTERM with a stopped client attached\n");
	g_cases_ok++;
}

/* tools/soak.sh: test_hostile --attack SOCKET PID SECONDS runs the cases
 * that leave moed serving, over and over, against that moed; exits 1 at the
 * first failing round. */
static int attack(char **argv)
{
	const struct CMUnitTest cases[] = {
		cmocka_unit_test_teardown(test_empty_fds, case_teardown),
		cmocka_unit_test_teardown(test_hugetlb, case_teardown),
		cmocka_unit_test_teardown(test_starvation, case_teardown),
		cmocka_unit_test_teardown(test_status_flood, case_teardown),
		cmocka_unit_test_teardown(test_total_shm, case_teardown),
		cmocka_unit_test_teardown(test_bad_entries, case_teardown),
		cmocka_unit_test_teardown(test_bad_rings, case_teardown),
		cmocka_unit_test_teardown(test_bad_regions, case_teardown),
		cmocka_unit_test_teardown(test_churn, case_teardown),
		cmocka_unit_test_teardown(test_cancel_flood, case_teardown),
	};
	static struct daemon d;
	uint64_t until = dh_now_ms() + 1000ull * strtoull(argv[4], NULL, 10);
	int rounds = 0;

	g_attack = true;
	d.sock = argv[2];
	d.pid = (pid_t)atoi(argv[3]);
	g_d = &d;
	if (dh_group_setup(NULL))
		return 2;
	while (dh_now_ms() < until) {
		if (cmocka_run_group_tests_name("attack round", cases, NULL, NULL))
			return 1;
		rounds++;
	}
	printf("attack: %d rounds of %zu cases\n", rounds, sizeof(cases) / sizeof(cases[0]));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "--attack")) {
		signal(SIGPIPE, SIG_IGN);
		return attack(argv);
	}
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_teardown(test_empty_fds, case_teardown),
		cmocka_unit_test_teardown(test_hugetlb, case_teardown),
		cmocka_unit_test_teardown(test_starvation, case_teardown),
		cmocka_unit_test_teardown(test_status_flood, case_teardown),
		cmocka_unit_test_teardown(test_total_shm, case_teardown),
		cmocka_unit_test_teardown(test_log_flood, case_teardown),
		cmocka_unit_test_teardown(test_bad_entries, case_teardown),
		cmocka_unit_test_teardown(test_bad_rings, case_teardown),
		cmocka_unit_test_teardown(test_bad_regions, case_teardown),
		cmocka_unit_test_teardown(test_churn, case_teardown),
		cmocka_unit_test_teardown(test_cancel_flood, case_teardown),
		cmocka_unit_test_teardown(test_stopped, case_teardown), /* last: stops moed */
	};

	signal(SIGPIPE, SIG_IGN);
	return cmocka_run_group_tests_name("hostile clients", tests, suite_setup, suite_teardown);
}
