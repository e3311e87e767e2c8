/* tests/wire.c — see wire.h. */
#include "tests/wire.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <setjmp.h>
#include <cmocka.h>

#include "client/include/moeclient.h"
#include "kernels/cpu/convert.h"

static struct raw *g_wire_raws[WIRE_MAX_RAW];

const char *dt_name(int dt)
{
	return dt == MOE_DTYPE_F32 ? "f32" : dt == MOE_DTYPE_BF16 ? "bf16" : "f16";
}

/* ------------------------------------------------------------------------ */
/* Checks against the in-process reference (daemon_harness.c)               */

static float elem(int dt, const void *p, size_t i)
{
	if (dt == MOE_DTYPE_F32)
		return ((const float *)p)[i];
	if (dt == MOE_DTYPE_BF16)
		return moe_bf16_to_f32(((const uint16_t *)p)[i]);
	return moe_f16_to_f32(((const uint16_t *)p)[i]);
}

/* out must be exactly what the in-process engine gives for in. */
void check_output(uint32_t layer, int dt, const void *in, const void *out, uint32_t n,
			 const char *what)
{
	size_t cnt = (size_t)n * g_H, bytes = cnt * dh_dt_size(dt);
	void *ref = malloc(bytes);

	assert_non_null(ref);
	dh_ref_forward(layer, dt, in, ref, n);
	if (memcmp(ref, out, bytes)) {
		size_t i = 0;

		while (i < cnt && !memcmp((const char *)ref + i * dh_dt_size(dt),
					  (const char *)out + i * dh_dt_size(dt), dh_dt_size(dt)))
			i++;
		fail_msg("%s: layer %u, %s, %u tokens: element %zu (token %zu) is %.9g, the "
			 "in-process engine gives %.9g",
			 what, layer, dt_name(dt), n, i, i / g_H, (double)elem(dt, out, i),
			 (double)elem(dt, ref, i));
	}
	free(ref);
}


int raw_connect(struct daemon *d)
{
	int fd = dh_raw_socket(d->sock);

	if (fd < 0)
		fail_msg("connect %s: %s", d->sock, strerror(errno));
	return fd;
}

/* One datagram with fds; 0 or -errno. */
int raw_sendmsg(int fd, const void *buf, size_t len, const int *fds, int nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr align;
	} u;
	struct iovec iov = {(void *)buf, len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};

	if (nfds > 0) {
		struct cmsghdr *cm;

		assert_true(nfds <= 16);
		memset(&u, 0, sizeof(u));
		mh.msg_control = u.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
	}
	return sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 ? -errno : 0;
}

int raw_send(int fd, uint16_t type, const void *payload, uint32_t len, const int *fds,
		    int nfds)
{
	char buf[MOE_MSG_MAX];
	size_t n = moe_msg_encode(buf, type, 7, payload, len);

	return raw_sendmsg(fd, buf, n, fds, nfds);
}

/* The daemon must answer with a refusal (HELLO_REPLY with an error status or
 * ERROR) and hang up. Closes fd. Returns the refusal's status. */
int expect_refused(int fd, const char *what)
{
	int st;

	if (!dh_raw_hangup(fd, DH_EXIT_MS, &st)) {
		close(fd);
		fail_msg("%s: moed did not hang up", what);
	}
	close(fd);
	if (st == 1)
		fail_msg("%s: moed hung up without a HELLO_REPLY error or an ERROR", what);
	if (st >= 0)
		fail_msg("%s: moed accepted it (status %d) before hanging up", what, st);
	return st;
}

/* A region memfd of `bytes` with `seals`, its header written for `entries`
 * ring entries (entries 0: no header). */
int make_memfd(uint64_t bytes, int seals, uint32_t entries)
{
	int fd = memfd_create("test_daemon_raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)bytes), 0);
	if (entries) {
		struct moe_shm_hdr h = {.magic = MOE_SHM_MAGIC, .version = MOE_SHM_VERSION,
					.sq_entries = entries, .cq_entries = entries,
					.region_bytes = bytes};

		assert_int_equal(pwrite(fd, &h, offsetof(struct moe_shm_hdr, sq_head), 0),
				 (ssize_t)offsetof(struct moe_shm_hdr, sq_head));
	}
	if (seals)
		assert_int_equal(fcntl(fd, F_ADD_SEALS, seals), 0);
	return fd;
}


void fill_hello(struct moe_msg_hello *h, uint32_t entries, uint64_t bytes)
{
	memset(h, 0, sizeof(*h));
	h->sq_entries = entries;
	h->cq_entries = entries;
	h->region_bytes = bytes;
	snprintf(h->client_name, sizeof(h->client_name), "raw");
}

/* HELLO with `fd` (or none, fd < 0) for a region of `bytes`; then the
 * daemon must refuse and hang up. */
int hello_refused(struct daemon *d, int fd, uint32_t entries, uint64_t bytes,
			 const char *what)
{
	struct moe_msg_hello h;
	int s = raw_connect(d);

	fill_hello(&h, entries, bytes);
	assert_int_equal(raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), &fd, fd >= 0 ? 1 : 0), 0);
	if (fd >= 0)
		close(fd);
	return expect_refused(s, what);
}

static void raw_track(struct raw *r, bool on)
{
	for (int i = 0; i < WIRE_MAX_RAW; i++) {
		if (on && !g_wire_raws[i]) {
			g_wire_raws[i] = r;
			return;
		}
		if (!on && g_wire_raws[i] == r) {
			g_wire_raws[i] = NULL;
			return;
		}
	}
	assert_false(on);
}

/* A correct handshake by hand. */
struct raw *raw_attach(struct daemon *d, uint64_t bytes, uint32_t entries)
{
	struct raw *r = calloc(1, sizeof(*r));
	struct moe_msg_hello h;
	struct moe_shm_layout lay;
	char buf[MOE_MSG_MAX];
	int memfd;

	assert_non_null(r);
	r->sock = raw_connect(d);
	r->bytes = bytes;
	r->entries = entries;
	raw_track(r, true);
	memfd = make_memfd(bytes, SEALS, entries);
	r->map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	assert_true(r->map != MAP_FAILED);
	fill_hello(&h, entries, bytes);
	assert_int_equal(raw_send(r->sock, MOE_MSG_HELLO, &h, sizeof(h), &memfd, 1), 0);
	close(memfd);
	for (;;) {
		ssize_t n = dh_raw_recv(r->sock, buf, sizeof(buf), DH_EXIT_MS);
		struct moe_msg_hdr mh;

		if (n <= 0)
			fail_msg("raw client: no HELLO_REPLY (%zd)", n);
		if (moe_msg_peek(buf, (size_t)n, &mh) == MOE_MSG_DOORBELL)
			continue;
		assert_int_equal(moe_msg_decode_hello_reply(buf, (size_t)n, &r->rep), 0);
		break;
	}
	if (r->rep.status)
		fail_msg("raw client refused: %s", moe_strerror(r->rep.status));
	assert_int_equal(moe_shm_layout(entries, entries, bytes, &lay), 0);
	assert_int_equal(r->rep.data_off, lay.data_off);
	assert_int_equal(r->rep.data_bytes, lay.data_bytes);
	assert_int_equal(r->rep.hidden, g_H);
	r->hdr = r->map;
	r->sq = (struct moe_sqe *)((char *)r->map + lay.sq_off);
	r->cq = (struct moe_cqe *)((char *)r->map + lay.cq_off);
	r->data = (unsigned char *)r->map + lay.data_off;
	r->data_bytes = lay.data_bytes;
	return r;
}

void raw_close(struct raw *r)
{
	if (!r)
		return;
	raw_track(r, false);
	if (r->sock >= 0)
		close(r->sock);
	if (r->map)
		munmap(r->map, r->bytes);
	free(r);
}

void raw_push(struct raw *r, const struct moe_sqe *q)
{
	uint32_t head = atomic_load_explicit(&r->hdr->sq_head, memory_order_acquire);

	assert_true(r->sq_tail - head < r->entries);
	r->sq[r->sq_tail & (r->entries - 1)] = *q;
	r->sq_tail++;
	atomic_store_explicit(&r->hdr->sq_tail, r->sq_tail, memory_order_release);
}

void raw_doorbell(struct raw *r)
{
	int e = raw_send(r->sock, MOE_MSG_DOORBELL, NULL, 0, NULL, 0);

	assert_true(e == 0 || e == -EAGAIN);
}

/* Reads and drops whatever the daemon sent (doorbells); false at EOF. */
bool raw_drain(struct raw *r)
{
	char buf[MOE_MSG_MAX];

	for (;;) {
		ssize_t n = dh_raw_recv(r->sock, buf, sizeof(buf), 0);

		if (n == 0)
			return false;
		if (n < 0)
			return true;
	}
}

/* Collects exactly n CQEs (bounded wait). Reads the socket (doorbells)
 * meanwhile unless `deaf`. */
void raw_wait(struct raw *r, struct moe_cqe *out, uint32_t n, bool deaf)
{
	uint64_t deadline = dh_now_ms() + DH_WAIT_MS;
	uint32_t got = 0;

	while (got < n) {
		uint32_t tail = atomic_load_explicit(&r->hdr->cq_tail, memory_order_acquire);

		assert_true(tail - r->cq_head <= r->entries);
		while (r->cq_head != tail && got < n)
			out[got++] = r->cq[r->cq_head++ & (r->entries - 1)];
		atomic_store_explicit(&r->hdr->cq_head, r->cq_head, memory_order_release);
		if (got == n)
			break;
		if (dh_now_ms() > deadline)
			fail_msg("raw client: %u of %u completions after %d ms", got, n, DH_WAIT_MS);
		if (deaf) {
			dh_nap_ms(1);
		} else {
			struct pollfd p = {r->sock, POLLIN, 0};

			atomic_store(&r->hdr->client_waiting, 1);
			poll(&p, 1, 20);
			atomic_store(&r->hdr->client_waiting, 0);
			if (!raw_drain(r))
				fail_msg("raw client: the daemon hung up");
		}
	}
}

struct moe_sqe sqe(uint64_t tag, uint32_t layer, uint32_t n, uint64_t in_off,
			  uint64_t out_off, uint16_t dtype)
{
	struct moe_sqe q = {.tag = tag, .layer = layer, .n_tokens = n, .in_off = in_off,
			    .out_off = out_off, .dtype = dtype};

	return q;
}

/* A real request through a raw client, its output checked. */
int child_hello(const char *sock, uint64_t bytes, int *status)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct moe_shm_hdr hd = {.magic = MOE_SHM_MAGIC, .version = MOE_SHM_VERSION,
				 .sq_entries = 4, .cq_entries = 4, .region_bytes = bytes};
	struct moe_msg_hello h;
	struct moe_msg_hello_reply rep;
	char buf[MOE_MSG_MAX];
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	int fd = memfd_create("wire-child", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	ssize_t k;

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock);
	if (s < 0 || fd < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) ||
	    ftruncate(fd, (off_t)bytes))
		return -11;
	if (pwrite(fd, &hd, offsetof(struct moe_shm_hdr, sq_head), 0) < 0 ||
	    fcntl(fd, F_ADD_SEALS, SEALS))
		return -12;
	fill_hello(&h, 4, bytes);
	if (raw_send(s, MOE_MSG_HELLO, &h, sizeof(h), &fd, 1))
		return -13;
	close(fd);
	k = recv(s, buf, sizeof(buf), 0);
	if (k <= 0 || moe_msg_decode_hello_reply(buf, (size_t)k, &rep))
		return -14;
	*status = rep.status;
	return s;
}

int child_admin(int s, uint32_t seq, uint32_t op, const void *payload, uint32_t len, int *status)
{
	struct {
		struct moe_msg_admin a;
		char p[MOE_ADMIN_DATA_MAX];
	} m = {{op, 0}, {0}};
	struct moe_msg_admin_reply ar;
	struct moe_msg_hdr mh;
	char buf[MOE_MSG_MAX], res[MOE_ADMIN_DATA_MAX];
	uint32_t rlen;
	ssize_t k;
	size_t n;

	if (len)
		memcpy(m.p, payload, len);
	n = moe_msg_encode(buf, MOE_MSG_ADMIN, seq, &m, (uint32_t)(sizeof(m.a) + len));
	if (raw_sendmsg(s, buf, n, NULL, 0))
		return -15;
	do /* skip doorbells */
		k = recv(s, buf, sizeof(buf), 0);
	while (k > 0 && moe_msg_peek(buf, (size_t)k, &mh) == MOE_MSG_DOORBELL);
	if (k <= 0 || moe_msg_decode_admin_reply(buf, (size_t)k, &ar, res, sizeof(res), &rlen))
		return -16;
	*status = ar.status;
	return 0;
}

void raw_forward_ok(struct raw *r, uint32_t layer, int dt, uint32_t n, uint64_t seed)
{
	size_t bytes = (size_t)n * g_H * dh_dt_size(dt);
	void *in = dh_make_input(dt, n, seed);
	struct moe_sqe q = sqe(0xabc000 + seed, layer, n, 0, (bytes + 63) & ~(size_t)63,
			       (uint16_t)dt);
	struct moe_cqe c;

	assert_true(2 * bytes + 64 <= r->data_bytes);
	memcpy(r->data, in, bytes);
	raw_push(r, &q);
	raw_doorbell(r);
	raw_wait(r, &c, 1, false);
	assert_int_equal(c.tag, q.tag);
	if (c.status)
		fail_msg("raw forward: %s", moe_strerror(c.status));
	check_output(layer, dt, in, r->data + q.out_off, n, "raw client");
	free(in);
}

void wire_close_all(void)
{
	for (int i = 0; i < WIRE_MAX_RAW; i++)
		if (g_wire_raws[i])
			raw_close(g_wire_raws[i]);
}
