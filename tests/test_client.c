/* tests/test_client.c — libmoeclient without a daemon: argument checks,
 * connection failures (no socket, a peer that refuses or hangs up), the
 * shared-area allocator, moe_strerror, and the message codec.
 *
 * The peers here are a few lines each on a socket in a temporary directory,
 * run in a thread; nothing is left behind and nothing waits long.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <moeclient.h>

#include "client/shm_alloc.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"
#include "tests/testutil.h"

static char *tmp;

static int group_setup(void **state)
{
	(void)state;
	tmp = tu_tmpdir();
	signal(SIGPIPE, SIG_DFL); /* a SIGPIPE would kill the test: none may come */
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	tu_rmtree(tmp);
	free(tmp);
	return 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------------ */
/* Fake peers                                                               */

enum peer_mode {
	PEER_HANGUP,    /* accept, read HELLO, close */
	PEER_ERROR,     /* answer HELLO with ERROR(MOE_ELIMIT) */
	PEER_REFUSE,    /* answer HELLO with HELLO_REPLY status MOE_EPERM */
	PEER_OK_HANGUP, /* answer HELLO properly, then close on the first doorbell */
};

struct peer {
	enum peer_mode mode;
	int lfd;
	char path[108];
	pthread_t th;
	int got_memfd_ok; /* the HELLO carried a sealed memfd of the claimed size */
};

static void *peer_main(void *arg)
{
	struct peer *p = arg;
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {buf.b, sizeof(buf.b)};
	struct msghdr mh = {.msg_iov = &iov,
	                    .msg_iovlen = 1,
	                    .msg_control = ctl.b,
	                    .msg_controllen = sizeof(ctl.b)};
	struct moe_msg_hello hello;
	int fd = accept(p->lfd, NULL, NULL), memfd = -1;
	ssize_t n;

	if (fd < 0)
		return NULL;
	n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
	if (n > 0 && !moe_msg_decode_hello(buf.b, (size_t)n, &hello)) {
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		struct stat st;

		if (cm && cm->cmsg_type == SCM_RIGHTS)
			memcpy(&memfd, CMSG_DATA(cm), sizeof(int));
		p->got_memfd_ok = memfd >= 0 && !fstat(memfd, &st) &&
		                  (uint64_t)st.st_size == hello.region_bytes &&
		                  (fcntl(memfd, F_GET_SEALS) & (F_SEAL_SHRINK | F_SEAL_GROW)) ==
		                      (F_SEAL_SHRINK | F_SEAL_GROW);
	}
	if (p->mode == PEER_ERROR) {
		struct moe_msg_error e = {.status = MOE_ELIMIT};

		snprintf(e.message, sizeof(e.message), "too many clients");
		n = (ssize_t)moe_msg_encode(buf.b, MOE_MSG_ERROR, 0, &e, sizeof(e));
		send(fd, buf.b, (size_t)n, MSG_NOSIGNAL);
	} else if (p->mode == PEER_REFUSE || p->mode == PEER_OK_HANGUP) {
		struct moe_msg_hello_reply r = {.proto_version = MOE_PROTO_VERSION,
		                                .hidden = 8,
		                                .n_moe_layers = 1,
		                                .max_batch_tokens = 4,
		                                .max_inflight_tokens = 4};
		struct moe_shm_layout lay;

		moe_shm_layout(hello.sq_entries, hello.cq_entries, hello.region_bytes, &lay);
		r.status = p->mode == PEER_REFUSE ? MOE_EPERM : 0;
		r.data_off = lay.data_off;
		r.data_bytes = lay.data_bytes;
		r.moe_layers[0] = 5;
		memcpy(r.family, "fake", 5);
		n = (ssize_t)moe_msg_encode(buf.b, MOE_MSG_HELLO_REPLY, 0, &r, sizeof(r));
		send(fd, buf.b, (size_t)n, MSG_NOSIGNAL);
		if (p->mode == PEER_OK_HANGUP)
			recv(fd, buf.b, sizeof(buf.b), 0); /* the first doorbell */
	}
	if (memfd >= 0)
		close(memfd);
	close(fd);
	return NULL;
}

static void peer_start(struct peer *p, enum peer_mode mode, const char *name)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};

	memset(p, 0, sizeof(*p));
	p->mode = mode;
	snprintf(p->path, sizeof(p->path), "%s/%s", tmp, name);
	assert_true(strlen(p->path) < sizeof(sa.sun_path));
	strcpy(sa.sun_path, p->path);
	p->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	assert_true(p->lfd >= 0);
	assert_int_equal(bind(p->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(p->lfd, 4), 0);
	assert_int_equal(pthread_create(&p->th, NULL, peer_main, p), 0);
}

static void peer_stop(struct peer *p)
{
	pthread_join(p->th, NULL);
	close(p->lfd);
	unlink(p->path);
}

/* Small regions: the tests create many. */
static const moe_connect_options small = {.region_bytes = 1 << 20, .queue_depth = 8};

/* ------------------------------------------------------------------------ */
/* Connecting                                                               */

static void test_connect_no_socket(void **state)
{
	char path[512], err[256] = "";
	moe_connect_options o = small;
	moe_client *c = (moe_client *)&o;
	double t0 = now_s();

	(void)state;
	snprintf(path, sizeof(path), "%s/nothing.sock", tmp);
	o.errbuf = err;
	o.errbuf_len = sizeof(err);
	assert_int_equal(moe_connect_opts(path, &o, &c), MOE_EDAEMON);
	assert_int_equal(errno, ENOENT);
	assert_null(c);
	assert_non_null(strstr(err, path));
	assert_non_null(strstr(err, "connect"));
	assert_true(now_s() - t0 < 1.0);
}

static void test_connect_env(void **state)
{
	char path[512];
	moe_client *c;

	(void)state;
	snprintf(path, sizeof(path), "%s/env.sock", tmp);
	setenv("MOED_SOCKET", path, 1);
	assert_int_equal(moe_connect(NULL, &c), MOE_EDAEMON);
	assert_int_equal(errno, ENOENT);
	unsetenv("MOED_SOCKET");
}

static void test_connect_bad_args(void **state)
{
	char path[300];
	moe_client *c;
	moe_connect_options o = {.queue_depth = 100000};

	(void)state;
	assert_int_equal(moe_connect("/x", NULL), MOE_EINVAL);
	assert_int_equal(moe_connect_opts("/x", &o, &c), MOE_EINVAL);
	memset(path, 'a', sizeof(path) - 1);
	path[0] = '/';
	path[sizeof(path) - 1] = '\0';
	assert_int_equal(moe_connect(path, &c), MOE_EINVAL); /* longer than sun_path */
	o = small;
	o.region_bytes = 8192; /* no room for rings and data */
	assert_int_equal(moe_connect_opts("/x", &o, &c), MOE_EINVAL);
}

static void test_connect_peer_hangs_up(void **state)
{
	struct peer p;
	moe_client *c;
	double t0 = now_s();

	(void)state;
	peer_start(&p, PEER_HANGUP, "hangup.sock");
	assert_int_equal(moe_connect_opts(p.path, &small, &c), MOE_EDAEMON);
	peer_stop(&p);
	assert_true(p.got_memfd_ok);
	assert_true(now_s() - t0 < 2.0);
}

static void test_connect_peer_error(void **state)
{
	struct peer p;
	char err[256] = "";
	moe_connect_options o = small;
	moe_client *c;

	(void)state;
	o.errbuf = err;
	o.errbuf_len = sizeof(err);
	peer_start(&p, PEER_ERROR, "error.sock");
	assert_int_equal(moe_connect_opts(p.path, &o, &c), MOE_ELIMIT);
	peer_stop(&p);
	assert_non_null(strstr(err, "too many clients"));
}

static void test_connect_peer_refuses(void **state)
{
	struct peer p;
	moe_client *c;

	(void)state;
	peer_start(&p, PEER_REFUSE, "refuse.sock");
	assert_int_equal(moe_connect_opts(p.path, &small, &c), MOE_EPERM);
	peer_stop(&p);
}

/* A daemon that goes away: calls fail with MOE_EDAEMON, no hang, no SIGPIPE. */
static void test_daemon_gone(void **state)
{
	struct peer p;
	moe_client *c;
	moe_model_info mi;
	moe_completion comp[2];
	uint64_t tag;
	char *json;
	double t0;
	int st;

	(void)state;
	peer_start(&p, PEER_OK_HANGUP, "gone.sock");
	assert_int_equal(moe_connect_opts(p.path, &small, &c), 0);
	assert_int_equal(moe_get_model_info(c, &mi), 0);
	assert_string_equal(mi.family, "fake");
	assert_int_equal(mi.hidden, 8);
	assert_int_equal(mi.n_moe_layers, 1);
	assert_int_equal(mi.moe_layers[0], 5);

	/* Checked before the daemon is asked. */
	float x[8 * 5];
	float *b = moe_buf_alloc(c, sizeof(x));

	assert_non_null(b);
	assert_int_equal(moe_forward(c, 4, MOE_DTYPE_F32, x, x, 1), MOE_ENOLAYER);
	assert_int_equal(moe_forward(c, 5, MOE_DTYPE_F32, x, x, 5), MOE_E2BIG);
	assert_int_equal(moe_forward(c, 5, (moe_dtype)7, x, x, 1), MOE_EDTYPE);
	assert_int_equal(moe_forward(c, 5, MOE_DTYPE_F32, x, x, 0), 0);
	assert_int_equal(moe_submit(c, 5, MOE_DTYPE_F32, x, x, 1, 0, &tag), MOE_ERANGE);
	assert_int_equal(moe_submit(c, 5, MOE_DTYPE_F32, b, x, 1, 0, &tag), MOE_ERANGE);
	assert_int_equal(moe_submit(c, 5, MOE_DTYPE_F32, b, b, 0, 0, &tag), MOE_EINVAL);
	assert_int_equal(moe_wait(c, 12345, 0, &st), MOE_ENOENT);
	assert_int_equal(moe_cancel(c, 12345), MOE_ENOENT);
	assert_int_equal(moe_poll(c, comp, 2), 0);

	/* The peer closes on the first doorbell: the request fails, nothing hangs. */
	t0 = now_s();
	assert_int_equal(moe_submit(c, 5, MOE_DTYPE_F32, b, b, 1, 0, &tag), 0);
	assert_int_equal(moe_wait(c, tag, 5000, &st), 0);
	assert_int_equal(st, MOE_EDAEMON);
	assert_true(now_s() - t0 < 2.0);
	assert_int_equal(moe_ping(c, NULL), MOE_EDAEMON);
	assert_int_equal(moe_status_json(c, &json, NULL), MOE_EDAEMON);
	assert_int_equal(moe_forward(c, 5, MOE_DTYPE_F32, x, x, 1), MOE_EDAEMON);
	assert_int_equal(moe_poll(c, comp, 2), MOE_EDAEMON);
	peer_stop(&p);
	assert_int_equal(moe_reconnect(c), MOE_EDAEMON); /* nobody listens now */
	moe_buf_free(c, b);
	moe_disconnect(c);
}

static void test_null_client(void **state)
{
	moe_model_info mi;
	uint64_t tag;
	char *j;

	(void)state;
	moe_disconnect(NULL);
	assert_null(moe_buf_alloc(NULL, 64));
	moe_buf_free(NULL, NULL);
	assert_int_equal(moe_get_model_info(NULL, &mi), MOE_EINVAL);
	assert_int_equal(moe_forward(NULL, 0, MOE_DTYPE_F32, &mi, &mi, 1), MOE_EINVAL);
	assert_int_equal(moe_submit(NULL, 0, MOE_DTYPE_F32, &mi, &mi, 1, 0, &tag), MOE_EINVAL);
	assert_int_equal(moe_poll(NULL, NULL, 0), MOE_EINVAL);
	assert_int_equal(moe_wait(NULL, 1, 0, NULL), MOE_EINVAL);
	assert_int_equal(moe_cancel(NULL, 1), MOE_EINVAL);
	assert_int_equal(moe_ping(NULL, NULL), MOE_EINVAL);
	assert_int_equal(moe_status_json(NULL, &j, NULL), MOE_EINVAL);
	assert_int_equal(moe_reconnect(NULL), MOE_EINVAL);
}

/* ------------------------------------------------------------------------ */
/* moe_strerror                                                             */

static void test_strerror(void **state)
{
	const char *seen[-MOE_EDEVICE + 1];

	(void)state;
	for (int e = 0; e >= MOE_EDEVICE; e--) {
		seen[-e] = moe_strerror(e);
		assert_non_null(seen[-e]);
		assert_true(strlen(seen[-e]) > 0);
		assert_string_not_equal(seen[-e], "unknown error");
		for (int k = 0; k < -e; k++)
			assert_string_not_equal(seen[k], seen[-e]);
	}
	assert_string_equal(moe_strerror(MOE_EDEVICE - 1), "unknown error");
	assert_string_equal(moe_strerror(1), "unknown error");
}

/* ------------------------------------------------------------------------ */
/* The shared-area allocator                                                */

static void test_alloc_basic(void **state)
{
	struct moe_shm_alloc a;
	uint64_t o1, o2, o3, o4;

	(void)state;
	assert_int_equal(moe_shm_alloc_init(&a, 1024 + 10), 0);
	assert_int_equal(a.size, 1024);
	assert_int_equal(moe_shm_alloc_get(&a, 0, &o1), -EINVAL);
	assert_int_equal(moe_shm_alloc_get(&a, 1, &o1), 0);
	assert_int_equal(o1, 0);
	assert_int_equal(moe_shm_alloc_len(&a, o1), 64);
	assert_int_equal(moe_shm_alloc_get(&a, 65, &o2), 0);
	assert_int_equal(o2, 64);
	assert_int_equal(moe_shm_alloc_len(&a, o2), 128);
	assert_int_equal(moe_shm_alloc_get(&a, 64, &o3), 0);
	assert_int_equal(o3, 192);
	assert_int_equal(moe_shm_alloc_largest(&a), 1024 - 256);
	assert_int_equal(moe_shm_alloc_get(&a, 1024 - 256 + 1, &o4), -ENOMEM);
	assert_int_equal(moe_shm_alloc_get(&a, UINT64_MAX, &o4), -ENOMEM);

	/* First fit: the hole left by o2 takes a 128-byte block. */
	assert_int_equal(moe_shm_alloc_put(&a, o2), 0);
	assert_int_equal(moe_shm_alloc_put(&a, o2), -ENOENT); /* double free */
	assert_int_equal(moe_shm_alloc_put(&a, o1 + 64 + 1), -ENOENT);
	assert_int_equal(moe_shm_alloc_get(&a, 100, &o4), 0);
	assert_int_equal(o4, 64);
	assert_int_equal(moe_shm_alloc_put(&a, o4), 0);

	/* Coalescing: after freeing all, one span of everything. */
	assert_int_equal(moe_shm_alloc_put(&a, o1), 0);
	assert_int_equal(a.n_free, 2); /* [0,192) and [256,1024) */
	assert_int_equal(moe_shm_alloc_put(&a, o3), 0);
	assert_int_equal(a.n_free, 1);
	assert_int_equal(moe_shm_alloc_largest(&a), 1024);
	assert_int_equal(moe_shm_alloc_get(&a, 1024, &o1), 0);
	assert_int_equal(o1, 0);
	assert_int_equal(a.n_free, 0);
	assert_int_equal(moe_shm_alloc_get(&a, 1, &o2), -ENOMEM);
	assert_int_equal(moe_shm_alloc_put(&a, o1), 0);
	moe_shm_alloc_fini(&a);

	assert_int_equal(moe_shm_alloc_init(&a, 63), 0); /* nothing to manage */
	assert_int_equal(moe_shm_alloc_get(&a, 1, &o1), -ENOMEM);
	moe_shm_alloc_fini(&a);
}

/* Random allocations and frees against a byte map of who owns what. */
static void test_alloc_random(void **state)
{
	enum { SIZE = 1 << 16, N = 64 };
	struct moe_shm_alloc a;
	static unsigned char owner[SIZE];
	uint64_t off[N], len[N];
	int live[N] = {0};
	unsigned seed = 12345;

	(void)state;
	memset(owner, 0, sizeof(owner));
	assert_int_equal(moe_shm_alloc_init(&a, SIZE), 0);
	for (int it = 0; it < 20000; it++) {
		int i = (int)(rand_r(&seed) % N);

		if (live[i]) {
			assert_int_equal(moe_shm_alloc_put(&a, off[i]), 0);
			memset(owner + off[i], 0, len[i]);
			live[i] = 0;
			continue;
		}
		len[i] = 1 + rand_r(&seed) % 3000;
		if (moe_shm_alloc_get(&a, len[i], &off[i])) {
			assert_true(moe_shm_alloc_largest(&a) < len[i]);
			continue;
		}
		assert_int_equal(off[i] % 64, 0);
		assert_true(off[i] + len[i] <= SIZE);
		assert_true(moe_shm_alloc_len(&a, off[i]) >= len[i]);
		for (uint64_t k = 0; k < len[i]; k++)
			assert_int_equal(owner[off[i] + k], 0);
		memset(owner + off[i], i + 1, len[i]);
		live[i] = 1;
		/* The free list stays sorted, disjoint and never adjacent. */
		for (size_t k = 1; k < a.n_free; k++)
			assert_true(a.free[k - 1].off + a.free[k - 1].len < a.free[k].off);
	}
	for (int i = 0; i < N; i++)
		if (live[i])
			assert_int_equal(moe_shm_alloc_put(&a, off[i]), 0);
	assert_int_equal(a.n_free, 1);
	assert_int_equal(a.n_used, 0);
	assert_int_equal(moe_shm_alloc_largest(&a), SIZE);
	moe_shm_alloc_fini(&a);
}

/* ------------------------------------------------------------------------ */
/* The message codec                                                        */

static void test_codec_roundtrip(void **state)
{
	unsigned char buf[MOE_MSG_MAX];
	struct moe_msg_hello h = {.sq_entries = 64, .cq_entries = 128, .region_bytes = 1 << 20}, h2;
	struct moe_msg_hello_reply r = {.proto_version = 1,
	                                .hidden = 2048,
	                                .n_moe_layers = 2,
	                                .dtype = MOE_WIRE_BF16,
	                                .data_off = 8192,
	                                .data_bytes = 4096},
	                           r2;
	struct moe_msg_cancel cn = {0x1234567890abcdefull}, cn2;
	struct moe_msg_status_reply s = {.json_bytes = 77}, s2;
	struct moe_msg_error e = {.status = MOE_EPROTO}, e2;
	struct moe_msg_hdr hd;
	size_t n;

	(void)state;
	memcpy(h.client_name, "tab\there", 9);
	n = moe_msg_encode(buf, MOE_MSG_HELLO, 7, &h, sizeof(h));
	assert_int_equal(moe_msg_peek(buf, n, &hd), MOE_MSG_HELLO);
	assert_int_equal(hd.seq, 7);
	assert_int_equal(moe_msg_decode_hello(buf, n, &h2), 0);
	assert_int_equal(h2.cq_entries, 128);
	assert_string_equal(h2.client_name, "tab?here"); /* control characters masked */
	h.cq_entries = 32;                               /* cq < sq */
	n = moe_msg_encode(buf, MOE_MSG_HELLO, 7, &h, sizeof(h));
	assert_int_equal(moe_msg_decode_hello(buf, n, &h2), MOE_EINVAL);

	r.moe_layers[1] = 9;
	memcpy(r.family, "qwen3_moe", 10);
	n = moe_msg_encode(buf, MOE_MSG_HELLO_REPLY, 1, &r, sizeof(r));
	assert_int_equal(moe_msg_decode_hello_reply(buf, n, &r2), 0);
	assert_memory_equal(&r, &r2, sizeof(r));
	assert_int_equal(moe_msg_decode_hello(buf, n, &h2), MOE_EPROTO); /* wrong type */
	r.n_moe_layers = MOE_MAX_MOE_LAYERS + 1;
	n = moe_msg_encode(buf, MOE_MSG_HELLO_REPLY, 1, &r, sizeof(r));
	assert_int_equal(moe_msg_decode_hello_reply(buf, n, &r2), MOE_EPROTO);

	n = moe_msg_encode(buf, MOE_MSG_CANCEL, 2, &cn, sizeof(cn));
	assert_int_equal(moe_msg_decode_cancel(buf, n, &cn2), 0);
	assert_true(cn2.tag == cn.tag);
	assert_int_equal(moe_msg_decode_cancel(buf, n - 1, &cn2), MOE_EPROTO); /* truncated */

	n = moe_msg_encode(buf, MOE_MSG_STATUS_REPLY, 3, &s, sizeof(s));
	assert_int_equal(moe_msg_decode_status_reply(buf, n, &s2), 0);
	assert_int_equal(s2.json_bytes, 77);

	memset(e.message, 'x', sizeof(e.message)); /* unterminated */
	n = moe_msg_encode(buf, MOE_MSG_ERROR, 4, &e, sizeof(e));
	assert_int_equal(moe_msg_decode_error(buf, n, &e2), 0);
	assert_int_equal(e2.status, MOE_EPROTO);
	assert_int_equal(strlen(e2.message), sizeof(e2.message) - 1);

	n = moe_msg_encode(buf, MOE_MSG_DOORBELL, 5, NULL, 0);
	assert_int_equal(n, sizeof(struct moe_msg_hdr));
	assert_int_equal(moe_msg_decode_empty(buf, n, MOE_MSG_DOORBELL), 0);
	assert_int_equal(moe_msg_decode_empty(buf, n, MOE_MSG_STATUS), MOE_EPROTO);
	buf[0] ^= 1; /* bad magic */
	assert_int_equal(moe_msg_decode_empty(buf, n, MOE_MSG_DOORBELL), MOE_EPROTO);
	assert_int_equal(moe_msg_peek(buf, 3, &hd), MOE_EPROTO);
}

static void test_shm_layout(void **state)
{
	struct moe_shm_layout l;

	(void)state;
	assert_int_equal(moe_shm_layout(256, 256, 64u << 20, &l), 0);
	assert_int_equal(l.sq_off, MOE_SHM_HDR_BYTES);
	assert_true(l.cq_off >= l.sq_off + 256 * sizeof(struct moe_sqe));
	assert_int_equal(l.cq_off % 64, 0);
	assert_int_equal(l.data_off % 4096, 0);
	assert_int_equal(l.data_off + l.data_bytes, 64u << 20);
	assert_int_equal(moe_shm_layout(3, 4, 1 << 20, &l), MOE_EINVAL);
	assert_int_equal(moe_shm_layout(8, 4, 1 << 20, &l), MOE_EINVAL);
	assert_int_equal(moe_shm_layout(8, 8, 4096, &l), MOE_EINVAL);
	assert_true(sizeof(struct moe_shm_hdr) <= MOE_SHM_HDR_BYTES);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_connect_no_socket),  cmocka_unit_test(test_connect_env),
	    cmocka_unit_test(test_connect_bad_args),   cmocka_unit_test(test_connect_peer_hangs_up),
	    cmocka_unit_test(test_connect_peer_error), cmocka_unit_test(test_connect_peer_refuses),
	    cmocka_unit_test(test_daemon_gone),        cmocka_unit_test(test_null_client),
	    cmocka_unit_test(test_strerror),           cmocka_unit_test(test_alloc_basic),
	    cmocka_unit_test(test_alloc_random),       cmocka_unit_test(test_codec_roundtrip),
	    cmocka_unit_test(test_shm_layout),
	};

	return cmocka_run_group_tests_name("client", tests, group_setup, group_teardown);
}
