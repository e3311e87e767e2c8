/* tests/test_core.c — the serving core: the engine worker, epochs, the admin
 * table and jobs, each against a real moed.
 *
 *  - control_during_batch: with a batch wedged in the worker
 *    (MOED_TEST_STALL_MS), a ping, a status and a new client's HELLO are all
 *    answered, and the batch's request is still not complete after them
 *    (ordering, not wall time: the old loop ran the batch first).
 *  - killed_mid_batch: a client process is SIGKILLed while its requests sit
 *    in a batch the worker holds; the batch later writes their outputs into
 *    its region, which must still be mapped (ASan: no use after unmap; a
 *    plain build: no SIGSEGV), and others are served right.
 *  - doorbells_while_busy: with both batch slots taken, moed sets the
 *    regions' sq_no_doorbell; an entry pushed then without a doorbell runs,
 *    and the flag is clear again once the daemon is idle.
 *  - epochs_under_load: an EPOCH_CYCLE job publishes 5000 epochs (the same
 *    weights, rebuilt placement tables) while three clients run: zero
 *    failed requests, every output bit for bit the in-process engine's,
 *    completion epochs monotone per client, and every epoch but the current
 *    retired (status counts; ASan's leak check at moed's exit).
 *  - placements_under_load: on `devices: cpu:2` with spare slots, a
 *    PLACEMENT_CYCLE job publishes 60 random placements (replicas copied
 *    into spare slots off the serving path, dropped after) while four
 *    client processes run: zero failed requests, every output bit for bit
 *    the in-process single-rank engine's, and the daemon's slot bytes back
 *    to what was loaded once the job ends (LeakSanitizer at exit).
 *  - admin_table: unknown op, short and long payloads, bad fields and
 *    flags, lookups of epochs, a job started, read, cancelled and its
 *    JOB_DONE; admin_privilege: the same ops from a non-admin uid.
 *
 * Every wait is bounded; no assertion is on wall time.
 */
#include <errno.h>
#include <grp.h>
#include <pthread.h>
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

#include "daemon/engine/model.h"
#include "tests/daemon_harness.h"
#include "tests/wire.h"
#include "tools/synth.h"

#define READY_MS 30000
#define STALL_MS 1500

static struct daemon *start(const char *cfg_extra, const char *env)
{
	return dh_fixture_daemon(cfg_extra, env, READY_MS);
}

static moe_client *cl_open(struct daemon *d, const char *name)
{
	return dh_cl_open_named(d, name);
}

static cJSON *jworker(cJSON *j)
{
	return dh_jget(j, "worker", cJSON_Object);
}

/* ---- admin messages by hand --------------------------------------------- */

static void admin_send(struct raw *r, uint32_t seq, uint32_t op, uint32_t flags,
		       const void *payload, uint32_t len)
{
	char buf[MOE_MSG_MAX], msg[MOE_MSG_MAX];
	struct moe_msg_admin a = {op, flags};
	size_t n;

	memcpy(msg, &a, sizeof(a));
	if (len)
		memcpy(msg + sizeof(a), payload, len);
	n = moe_msg_encode(buf, MOE_MSG_ADMIN, seq, msg, (uint32_t)(sizeof(a) + len));
	assert_int_equal(raw_sendmsg(r->sock, buf, n, NULL, 0), 0);
}

/* The next message of `type` with `seq` (doorbells skipped; anything else
 * fails the test). Returns its length. */
static ssize_t recv_msg_of(struct raw *r, uint16_t type, uint32_t seq, char *buf)
{
	for (;;) {
		ssize_t n = dh_raw_recv(r->sock, buf, MOE_MSG_MAX, DH_WAIT_MS);
		struct moe_msg_hdr h;
		int t;

		if (n <= 0)
			fail_msg("no message of type %u (seq %u) from moed (%zd)", type, seq, n);
		t = moe_msg_peek(buf, (size_t)n, &h);
		if (t == MOE_MSG_DOORBELL)
			continue;
		if (t != type || h.seq != seq)
			fail_msg("expected message type %u seq %u, got type %d seq %u", type, seq, t,
				 h.seq);
		return n;
	}
}

struct reply {
	struct moe_msg_admin_reply r;
	char data[MOE_ADMIN_DATA_MAX];
	uint32_t len;
};

static uint32_t g_seq = 100; /* the seq of the last ADMIN sent */

static int admin(struct raw *r, uint32_t op, uint32_t flags, const void *payload, uint32_t len,
		 struct reply *out)
{
	uint32_t seq = ++g_seq;
	char buf[MOE_MSG_MAX];
	ssize_t n;

	admin_send(r, seq, op, flags, payload, len);
	n = recv_msg_of(r, MOE_MSG_ADMIN_REPLY, seq, buf);
	assert_int_equal(moe_msg_decode_admin_reply(buf, (size_t)n, &out->r, out->data,
						    sizeof(out->data), &out->len),
			 0);
	return out->r.status;
}

static void expect_refusal(struct raw *r, uint32_t op, uint32_t flags, const void *payload,
			   uint32_t len, int want, const char *says)
{
	struct reply rep;
	int st = admin(r, op, flags, payload, len, &rep);

	printf("admin op %u, %u payload bytes, flags 0x%x: %s: %s\n", op, len, flags,
	       moe_strerror(st), rep.r.message);
	assert_int_equal(st, want);
	if (!strstr(rep.r.message, says))
		fail_msg("refusal \"%s\" does not say \"%s\"", rep.r.message, says);
}

/* The next JOB_DONE (doorbells skipped); returns its seq. */
static uint32_t recv_job_done(struct raw *r, struct moe_admin_job *jd)
{
	char buf[MOE_MSG_MAX];
	struct moe_msg_hdr h;
	ssize_t n;

	do {
		n = dh_raw_recv(r->sock, buf, sizeof(buf), DH_WAIT_MS);
		if (n <= 0)
			fail_msg("no JOB_DONE from moed (%zd)", n);
	} while (moe_msg_peek(buf, (size_t)n, &h) == MOE_MSG_DOORBELL);
	assert_int_equal(moe_msg_decode_job_done(buf, (size_t)n, jd), 0);
	return h.seq;
}

static struct moe_admin_job job_of(const struct reply *rep)
{
	struct moe_admin_job j;

	assert_int_equal(rep->len, sizeof(j));
	memcpy(&j, rep->data, sizeof(j));
	return j;
}

/* Waits (bounded) until the worker holds a batch it has been running for a
 * while; returns that status (the caller deletes it). */
static cJSON *worker_busy(moe_client *a)
{
	for (uint64_t t0 = dh_now_ms();; dh_nap_ms(5)) {
		cJSON *j = dh_status(a, true);

		if (dh_jnum(jworker(j), "batches_held") >= 1 && dh_jnum(jworker(j), "busy_ms") > 0)
			return j;
		cJSON_Delete(j);
		if (dh_now_ms() - t0 > DH_WAIT_MS)
			fail_msg("the worker never held the batch");
	}
}

/* ---- a. control messages while a batch computes ------------------------- */

static void test_control_during_batch(void **state)
{
	char env[64];
	struct daemon *d;
	moe_client *a, *b;
	struct req q;
	cJSON *j;
	int st;

	(void)state;
	snprintf(env, sizeof(env), "MOED_TEST_STALL_MS=%d", STALL_MS);
	d = start(NULL, env);
	a = cl_open(d, "batch");
	dh_req_submit(a, &q, g_model->layers[0].index, MOE_DTYPE_F32, 8, 11, 0);
	/* the status comes back while the worker holds the request's batch */
	j = worker_busy(a);
	printf("status answered while the worker runs a batch (busy %.0f ms)\n",
	       dh_jnum(jworker(j), "busy_ms"));
	cJSON_Delete(j);
	assert_int_equal(moe_ping(a, NULL), 0);
	b = cl_open(d, "newcomer"); /* a HELLO answered */
	assert_int_equal(moe_ping(b, NULL), 0);
	j = dh_status(b, true);
	cJSON_Delete(j);
	/* ... and the batch is still running after all of that */
	assert_int_equal(moe_wait(a, q.tag, 0, &st), MOE_ETIMEDOUT);
	printf("ping, status, a new client's HELLO and ping: all answered before the batch "
	       "ended\n");
	assert_int_equal(moe_wait(a, q.tag, DH_WAIT_MS, &st), 0);
	assert_int_equal(st, 0);
	check_output(q.layer, q.dt, q.copy, q.out, q.n, "the stalled batch");
	dh_req_free(a, &q);
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- b. a client killed while its requests are in a batch --------------- */

static void test_killed_mid_batch(void **state)
{
	char env[64];
	struct daemon *d;
	moe_client *v;

	(void)state;
	snprintf(env, sizeof(env), "MOED_TEST_STALL_MS=%d", STALL_MS / 3);
	d = start(NULL, env);
	v = cl_open(d, "victim");
	for (int round = 0; round < 3; round++) {
		int pfd[2];
		pid_t p;
		char x;
		struct req q;
		int st, found = 0;

		assert_int_equal(pipe(pfd), 0);
		p = fork();
		assert_true(p >= 0);
		if (p == 0) {
			moe_connect_options o = {.name = "doomed"};
			moe_client *c;
			void *in, *out;
			uint64_t tag;

			close(pfd[0]);
			if (moe_connect_opts(d->sock, &o, &c))
				_exit(1);
			for (int i = 0; i < 4; i++) {
				size_t bytes = (size_t)64 * g_H * 4;

				in = moe_buf_alloc(c, bytes);
				out = moe_buf_alloc(c, bytes);
				if (!in || !out)
					_exit(2);
				for (size_t k = 0; k < bytes / 4; k++)
					((float *)in)[k] = (float)(k % 97) / 50.0f - 1.0f;
				if (moe_submit(c, g_model->layers[i % g_model->n_moe_layers].index,
					       MOE_DTYPE_F32, in, out, 64, 0, &tag))
					_exit(3);
			}
			if (write(pfd[1], "x", 1) != 1)
				_exit(4);
			for (;;)
				pause();
		}
		close(pfd[1]);
		assert_int_equal(read(pfd[0], &x, 1), 1);
		close(pfd[0]);
		/* the victim's request joins the traffic */
		dh_req_submit(v, &q, g_model->layers[0].index, MOE_DTYPE_BF16, 3, 40 + round, 0);
		/* wait until the doomed client's requests are inside a batch */
		for (uint64_t t0 = dh_now_ms(); !found;) {
			cJSON *j = dh_status(v, true), *cl = dh_jget(j, "clients", cJSON_Array), *c;

			cJSON_ArrayForEach(c, cl)
			{
				cJSON *n = cJSON_GetObjectItem(c, "name");

				if (cJSON_IsString(n) && !strcmp(n->valuestring, "doomed") &&
				    dh_jnum(c, "inflight") > 0 &&
				    dh_jnum(jworker(j), "busy_ms") > 0)
					found = 1;
			}
			cJSON_Delete(j);
			if (!found && dh_now_ms() - t0 > DH_WAIT_MS)
				fail_msg("the doomed client's batch never reached the worker");
			if (!found)
				dh_nap_ms(2);
		}
		kill(p, SIGKILL);
		assert_int_equal(waitpid(p, &st, 0), p);
		assert_int_equal(moe_wait(v, q.tag, DH_WAIT_MS, &st), 0);
		assert_int_equal(st, 0);
		check_output(q.layer, q.dt, q.copy, q.out, q.n, "the victim beside a killed client");
		dh_req_free(v, &q);
		dh_expect_alive(d, "a client killed mid-batch");
	}
	{
		/* the drops happened while a batch held the client */
		FILE *f = fopen(d->log, "r");
		char line[1024];
		int held = 0;

		assert_non_null(f);
		while (fgets(line, sizeof(line), f))
			held += strstr(line, "doomed") && strstr(line, "engine worker lets go") != NULL;
		fclose(f);
		printf("3 clients SIGKILLed with requests in the worker's batches; %d dropped while "
		       "a batch still held them\n", held);
		assert_true(held >= 1);
	}
	raw_forward_ok(raw_attach(d, 1 << 20, 4), g_model->layers[0].index, MOE_DTYPE_F32, 2, 77);
	wire_close_all();
	dh_daemon_stop(d); /* exit 0: under ASan, no error at exit either */
	g_passed = true;
}

/* ---- b2. no doorbell needed while both batch slots are taken ------------- */

/* Waits (bounded) until the region's sq_no_doorbell reads `want`. */
static void wait_no_doorbell(struct raw *r, uint32_t want, const char *when)
{
	for (uint64_t t0 = dh_now_ms();
	     atomic_load(&r->hdr->sq_no_doorbell) != want; dh_nap_ms(2))
		if (dh_now_ms() - t0 > DH_WAIT_MS)
			fail_msg("sq_no_doorbell never read %u %s", want, when);
}

/* With one batch running (wedged by MOED_TEST_STALL_MS) and a second one
 * waiting, moed tells the clients that a new entry needs no doorbell; an
 * entry pushed then without one still runs (the loop reads the rings when
 * the running batch ends), and once both slots are free the flag is
 * cleared, so that an idle daemon is rung for again. (The race between a
 * client reading the flag and the loop clearing it is closed by fences on
 * both sides, io.c; a lost doorbell would cost latency, not the request:
 * the loop also reads every ring on each tick.) */
static void test_doorbells_while_busy(void **state)
{
	char env[64];
	struct daemon *d;
	struct raw *r;
	moe_client *a;
	struct moe_cqe c[3];
	struct moe_sqe q[3];
	void *in[3];
	size_t bytes = (size_t)2 * g_H * 4, span = (bytes + 63) & ~(size_t)63;
	uint32_t layer = g_model->layers[0].index;

	(void)state;
	snprintf(env, sizeof(env), "MOED_TEST_STALL_MS=%d", STALL_MS / 3);
	d = start(NULL, env);
	a = cl_open(d, "watcher");
	r = raw_attach(d, 1 << 20, 4);
	assert_true(6 * span <= r->data_bytes);
	for (int i = 0; i < 3; i++) {
		in[i] = dh_make_input(MOE_DTYPE_F32, 2, 90 + (uint64_t)i);
		memcpy(r->data + (size_t)i * 2 * span, in[i], bytes);
	}
	for (int i = 0; i < 3; i++) /* buffers: in 2i, out 2i + 1 */
		q[i] = sqe(0xd00 + (uint64_t)i, layer, 2, (uint64_t)i * 2 * span,
			   ((uint64_t)i * 2 + 1) * span, MOE_DTYPE_F32);
	assert_int_equal(atomic_load(&r->hdr->sq_no_doorbell), 0); /* idle: ring */
	raw_push(r, &q[0]);
	raw_doorbell(r);
	cJSON_Delete(worker_busy(a)); /* the worker runs it */
	assert_int_equal(atomic_load(&r->hdr->sq_no_doorbell), 0); /* one slot: ring */
	raw_push(r, &q[1]); /* the waiting batch */
	raw_doorbell(r);
	wait_no_doorbell(r, 1, "with both batch slots taken");
	raw_push(r, &q[2]); /* no doorbell */
	raw_wait(r, c, 3, true); /* (deaf: only the completion ring) */
	for (int i = 0; i < 3; i++) {
		assert_int_equal(c[i].tag, 0xd00 + (uint64_t)i); /* in order: 0, 1, then 2 */
		assert_int_equal(c[i].status, 0);
		check_output(layer, MOE_DTYPE_F32, in[i],
			     r->data + ((size_t)i * 2 + 1) * span, 2,
			     "a request pushed without a doorbell");
		free(in[i]);
	}
	wait_no_doorbell(r, 0, "once the batches ended");
	printf("an entry pushed without a doorbell while both batch slots were taken ran; "
	       "the flag is clear again once idle\n");
	raw_forward_ok(r, layer, MOE_DTYPE_F32, 2, 5); /* rung for, served */
	wire_close_all();
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- c. epochs published under load -------------------------------------- */

#define LOAD_CLIENTS 3

static void test_epochs_under_load(void **state)
{
	struct daemon *d = start(NULL, NULL);
	struct moe_admin_cycle cy = {5000, 20};
	struct dh_loader L[LOAD_CLIENTS];
	pthread_t th[LOAD_CLIENTS];
	atomic_bool stop = false;
	struct moe_admin_job jd;
	struct reply rep;
	uint32_t start_seq;
	struct raw *r;
	uint64_t total = 0, seen = 0;
	moe_client *c;
	cJSON *j;

	(void)state;
	for (int i = 0; i < LOAD_CLIENTS; i++) {
		L[i] = (struct dh_loader){.d = d, .stop = &stop, .id = i};
		assert_int_equal(pthread_create(&th[i], NULL, dh_load_loop, &L[i]), 0);
	}
	dh_nap_ms(50); /* traffic first */
	r = raw_attach(d, 1 << 20, 4);
	assert_int_equal(admin(r, MOE_ADMIN_EPOCH_CYCLE, 0, &cy, sizeof(cy), &rep), 0);
	jd = job_of(&rep);
	printf("epoch-cycle: %s (job %u)\n", rep.r.message, jd.job);
	/* JOB_DONE comes with the seq of the ADMIN that started it */
	start_seq = g_seq;
	assert_int_equal(recv_job_done(r, &jd), start_seq);
	printf("JOB_DONE: job %u state %u, %llu of %llu: %s\n", jd.job, jd.state,
	       (unsigned long long)jd.done, (unsigned long long)jd.total, jd.message);
	assert_int_equal(jd.state, MOE_JOB_DONE);
	assert_int_equal(jd.done, cy.count);
	dh_nap_ms(50); /* traffic after the last publish too */
	atomic_store(&stop, true);
	for (int i = 0; i < LOAD_CLIENTS; i++) {
		pthread_join(th[i], NULL);
		printf("client %d: %llu requests, %llu failed, %llu wrong, epochs %u..%u (%llu "
		       "changes), %llu out of order%s%s\n", i, (unsigned long long)L[i].requests,
		       (unsigned long long)L[i].failed, (unsigned long long)L[i].wrong,
		       L[i].first_epoch, L[i].last_epoch, (unsigned long long)L[i].epochs_seen,
		       (unsigned long long)L[i].not_monotone, L[i].why[0] ? ": " : "", L[i].why);
		assert_int_equal(L[i].failed, 0);
		assert_int_equal(L[i].wrong, 0);
		assert_int_equal(L[i].not_monotone, 0);
		assert_true(L[i].requests > 0);
		total += L[i].requests;
		seen += L[i].epochs_seen;
	}
	/* the publishes really happened under the clients' feet */
	assert_true(seen > LOAD_CLIENTS);
	c = cl_open(d, "epoch-check");
	j = dh_status(c, true);
	{
		cJSON *e = dh_jget(j, "epochs", cJSON_Object);

		printf("%llu requests; epochs: current %.0f, published %.0f, retired %.0f\n",
		       (unsigned long long)total, dh_jnum(e, "current"), dh_jnum(e, "published"),
		       dh_jnum(e, "retired"));
		assert_int_equal((uint64_t)dh_jnum(e, "published"), cy.count + 1);
		assert_int_equal((uint64_t)dh_jnum(e, "retired"), cy.count);
		assert_int_equal((uint64_t)dh_jnum(e, "current"), cy.count + 1);
	}
	cJSON_Delete(j);
	{
		/* what the ids mean: the current one, a retired one, a forgotten one */
		struct moe_admin_epoch q = {cy.count + 1, 0};
		struct moe_admin_epoch_info info;
		uint32_t v[MOE_MAX_MOE_LAYERS];

		assert_int_equal(admin(r, MOE_ADMIN_EPOCH_INFO, 0, &q, sizeof(q), &rep), 0);
		memcpy(&info, rep.data, sizeof(info));
		assert_int_equal(info.id, cy.count + 1);
		assert_true(info.flags & MOE_EPOCH_CURRENT);
		assert_int_equal(info.n_layers, g_model->n_moe_layers);
		assert_int_equal(rep.len, sizeof(info) + info.n_layers * sizeof(uint32_t));
		memcpy(v, rep.data + sizeof(info), info.n_layers * sizeof(uint32_t));
		for (uint32_t l = 0; l < info.n_layers; l++)
			assert_int_equal(v[l], 1); /* the same weights all along */
		printf("epoch %u: %s\n", q.id, rep.r.message);
		q.id = cy.count - 5;
		assert_int_equal(admin(r, MOE_ADMIN_EPOCH_INFO, 0, &q, sizeof(q), &rep), 0);
		memcpy(&info, rep.data, sizeof(info));
		assert_true(info.flags & MOE_EPOCH_RETIRED);
		printf("epoch %u: %s\n", q.id, rep.r.message);
		q.id = 2;
		assert_int_equal(admin(r, MOE_ADMIN_EPOCH_INFO, 0, &q, sizeof(q), &rep), MOE_ENOENT);
		printf("epoch %u: %s\n", q.id, rep.r.message);
	}
	wire_close_all();
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- d. the admin table -------------------------------------------------- */

static void test_admin_table(void **state)
{
	struct daemon *d = start(NULL, NULL);
	struct raw *r = raw_attach(d, 1 << 20, 4);
	struct moe_admin_epoch ep = {1, 0};
	struct moe_admin_cycle cy = {1000000, 1000};
	struct moe_admin_job_ref ref = {0, 0};
	struct moe_admin_job jd;
	uint32_t start_seq;
	char junk[64] = {0};
	struct reply rep;
	moe_client *c;
	cJSON *j;

	(void)state;
	/* refused, and the session goes on after each */
	expect_refusal(r, 99, 0, NULL, 0, MOE_EINVAL, "unknown admin command 99");
	expect_refusal(r, 0, 0, NULL, 0, MOE_EINVAL, "unknown admin command 0");
	expect_refusal(r, MOE_ADMIN_EPOCH_INFO, 0, &ep, 4, MOE_EINVAL,
		       "a payload of 4 bytes, it takes 8");
	expect_refusal(r, MOE_ADMIN_EPOCH_INFO, 0, junk, 12, MOE_EINVAL,
		       "a payload of 12 bytes, it takes 8");
	expect_refusal(r, MOE_ADMIN_UNDRAIN, 0, junk, 8, MOE_EINVAL,
		       "a payload of 8 bytes, it takes 0");
	expect_refusal(r, MOE_ADMIN_UNDRAIN, 0x80, NULL, 0, MOE_EINVAL, "unknown flags 0x80");
	expect_refusal(r, MOE_ADMIN_EPOCH_INFO, 0, &(struct moe_admin_epoch){1, 7}, 8, MOE_EINVAL,
		       "reserved field not 0");
	expect_refusal(r, MOE_ADMIN_EPOCH_CYCLE, 0, &(struct moe_admin_cycle){0, 0}, 8, MOE_EINVAL,
		       "count must be");
	expect_refusal(r, MOE_ADMIN_EPOCH_INFO, 0, &(struct moe_admin_epoch){4242, 0}, 8,
		       MOE_ENOENT, "epoch 4242: unknown");
	expect_refusal(r, MOE_ADMIN_JOB_STATUS, 0, &(struct moe_admin_job_ref){77, 0}, 8,
		       MOE_ENOENT, "job 77: unknown");
	{
		/* a payload as large as a datagram allows: refused, not truncated */
		static char big[MOE_MSG_MAX - sizeof(struct moe_msg_hdr) - 8];

		expect_refusal(r, MOE_ADMIN_EPOCH_INFO, 0, big, sizeof(big), MOE_EINVAL,
			       "it takes 8");
	}
	assert_int_equal(admin(r, MOE_ADMIN_EPOCH_INFO, 0, &ep, sizeof(ep), &rep), 0);
	printf("epoch 1: %s\n", rep.r.message);

	/* a job: started, read, cancelled, then its JOB_DONE (with the seq of
	 * the ADMIN that started it) */
	assert_int_equal(admin(r, MOE_ADMIN_EPOCH_CYCLE, 0, &cy, sizeof(cy), &rep), 0);
	start_seq = g_seq;
	jd = job_of(&rep);
	assert_int_equal(jd.state, MOE_JOB_RUNNING);
	assert_int_equal(jd.total, cy.count);
	ref.job = jd.job;
	assert_int_equal(admin(r, MOE_ADMIN_JOB_STATUS, 0, &ref, sizeof(ref), &rep), 0);
	assert_int_equal(job_of(&rep).state, MOE_JOB_RUNNING);
	printf("job %u: %s\n", jd.job, rep.r.message);
	assert_int_equal(admin(r, MOE_ADMIN_JOB_CANCEL, 0, &ref, sizeof(ref), &rep), 0);
	printf("cancel: %s\n", rep.r.message);
	assert_int_equal(recv_job_done(r, &jd), start_seq);
	printf("JOB_DONE (seq %u): job %u state %u result %s, %llu of %llu: %s\n", start_seq,
	       jd.job, jd.state, moe_strerror(jd.result), (unsigned long long)jd.done,
	       (unsigned long long)jd.total, jd.message);
	assert_int_equal(jd.job, ref.job);
	assert_int_equal(jd.state, MOE_JOB_CANCELLED);
	assert_int_equal(jd.result, MOE_ECANCELED);
	assert_true(jd.done < jd.total);
	assert_int_equal(admin(r, MOE_ADMIN_JOB_STATUS, 0, &ref, sizeof(ref), &rep), 0);
	assert_int_equal(job_of(&rep).state, MOE_JOB_CANCELLED);

	/* the status counts the refusals and shows the job */
	c = cl_open(d, "admin-check");
	j = dh_status(c, true);
	/* the nine refused by the table (not the two unknown ids its ops answered) */
	assert_int_equal(dh_jnum(dh_jget(j, "requests", cJSON_Object), "admin_refused"), 9);
	{
		cJSON *jobs = dh_jget(j, "jobs", cJSON_Array), *x = cJSON_GetArrayItem(jobs, 0);

		assert_non_null(x);
		assert_string_equal(dh_jget(x, "state", cJSON_String)->valuestring, "cancelled");
		assert_string_equal(dh_jget(x, "op", cJSON_String)->valuestring, "epoch-cycle");
	}
	cJSON_Delete(j);
	raw_forward_ok(r, g_model->layers[0].index, MOE_DTYPE_F32, 2, 5);
	wire_close_all();
	dh_daemon_stop(d);
	g_passed = true;
}

/* ---- e. privileges per op ------------------------------------------------- */

/* As uid `uid` in the socket's group (gid `gid`): attach by hand, then
 * EPOCH_INFO must answer, EPOCH_CYCLE, JOB_CANCEL and DRAIN be refused with
 * MOE_EPERM. Exit status: 0, or which step failed. No cmocka here. */
static void privilege_child(const char *sock, uid_t uid, gid_t gid)
{
	static const struct {
		uint32_t op, len;
		int want;
	} steps[] = {
		{MOE_ADMIN_EPOCH_INFO, sizeof(struct moe_admin_epoch), 0},
		{MOE_ADMIN_EPOCH_CYCLE, sizeof(struct moe_admin_cycle), MOE_EPERM},
		{MOE_ADMIN_JOB_CANCEL, sizeof(struct moe_admin_job_ref), MOE_EPERM},
		{MOE_ADMIN_DRAIN, 0, MOE_EPERM},
	};
	int s, st;

	if (setgroups(0, NULL) || setgid(gid) || setuid(uid))
		_exit(10);
	s = child_hello(sock, 1 << 20, &st);
	if (s < 0)
		_exit(-s);
	if (st)
		_exit(14);
	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		uint32_t p[4] = {1, 0, 0, 0}; /* epoch 1 / one epoch / job 1 */
		int r = child_admin(s, 50 + (uint32_t)i, steps[i].op, p, steps[i].len, &st);

		if (r)
			_exit(-r);
		if (st != steps[i].want)
			_exit(20 + (int)i);
	}
	close(s);
	_exit(0);
}

static void test_admin_privilege(void **state)
{
	struct daemon *d;
	pid_t p;
	int ws = 0;

	(void)state;
	if (geteuid() != 0) {
		printf("test_admin_privilege: SKIPPED (needs root to act as another uid)\n");
		skip();
	}
	d = start(NULL, NULL);
	assert_int_equal(chmod(d->dir, 0755), 0); /* other uids may reach the socket */
	/* uid nobody, in the socket's group (root's, as moed runs as root
	 * here): may forward and look up epochs, nothing more */
	p = fork();
	assert_true(p >= 0);
	if (p == 0)
		privilege_child(d->sock, 65534, getegid());
	assert_int_equal(waitpid(p, &ws, 0), p);
	if (!WIFEXITED(ws) || WEXITSTATUS(ws))
		fail_msg("the non-admin child failed at step %d (wait status 0x%x)",
			 WIFEXITED(ws) ? WEXITSTATUS(ws) : -1, ws);
	printf("uid 65534 in the socket's group: epoch-info answered; epoch-cycle, job-cancel "
	       "and drain refused with MOE_EPERM\n");
	dh_daemon_stop(d);
	g_passed = true;
}

static double weight_bytes(moe_client *c)
{
	cJSON *j = dh_status(c, true);
	double v = dh_jnum(dh_jget(j, "backend", cJSON_Object), "weight_bytes");

	cJSON_Delete(j);
	return v;
}

static void test_placements_under_load(void **state)
{
	struct daemon *d = start("devices: cpu:2\nplacement:\n  spare_slots: 2\n", NULL);
	struct moe_admin_placement_cycle pc = {60, 2000, 7};
	struct dh_loaders *lp;
	struct moe_admin_job jd;
	struct reply rep;
	struct raw *r;
	moe_client *c = cl_open(d, "slots");
	double base = weight_bytes(c), now = 0;
	uint64_t total;

	(void)state;
	lp = dh_loaders_start(d, 4, 10); /* four client processes */
	dh_nap_ms(50);
	r = raw_attach(d, 1 << 20, 4);
	assert_int_equal(admin(r, MOE_ADMIN_PLACEMENT_CYCLE, 0, &pc, sizeof(pc), &rep), 0);
	jd = job_of(&rep);
	recv_job_done(r, &jd);
	printf("placement-cycle: job %u state %u: %s\n", jd.job, jd.state, jd.message);
	assert_int_equal(jd.state, MOE_JOB_DONE);
	assert_int_equal(jd.done, pc.count);
	dh_nap_ms(50);
	total = dh_loaders_stop(lp); /* (asserts no failed and no wrong request) */
	/* the replicas' slots are freed as the last batches on their epochs
	 * end: nothing runs now, so the count is back */
	for (uint64_t until = dh_now_ms() + READY_MS; dh_now_ms() < until;) {
		now = weight_bytes(c);
		if (now == base)
			break;
		dh_nap_ms(10);
	}
	printf("%llu requests under 60 placements; slot bytes %.0f, loaded %.0f\n",
	       (unsigned long long)total, now, base);
	assert_true(now == base);
	{
		/* spare_slots 0: refused with a reason, not a crash */
		struct daemon *d0 = start("devices: cpu:2\n", NULL);
		struct raw *r0 = raw_attach(d0, 1 << 20, 4);

		assert_int_equal(admin(r0, MOE_ADMIN_PLACEMENT_CYCLE, 0, &pc, sizeof(pc), &rep), 0);
		jd = job_of(&rep);
		recv_job_done(r0, &jd);
		assert_int_equal(jd.state, MOE_JOB_FAILED);
		assert_non_null(strstr(jd.message, "spare"));
		dh_daemon_stop(d0);
	}
	wire_close_all();
	dh_daemon_stop(d);
	g_passed = true;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_control_during_batch, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_killed_mid_batch, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_doorbells_while_busy, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_epochs_under_load, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_admin_table, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_admin_privilege, dh_setup, dh_teardown),
		cmocka_unit_test_setup_teardown(test_placements_under_load, dh_setup, dh_teardown),
	};

	return cmocka_run_group_tests(tests, dh_group_setup, dh_group_teardown);
}
