/* tests/fuzz/fuzz_session.c — moed's session state machine (daemon/
 * server.c) driven by sequences of messages with fds, not one decoder at a
 * time. The real server runs in a thread on a stand-in engine
 * (session_engine.c); each input is a script of operations on one or more
 * connections:
 *
 *   HELLO with a memfd of chosen size, seals and header, or 0 or 2 fds;
 *   a datagram of arbitrary bytes (empty included) with 0-3 fds;
 *   a well-framed message of any type with an arbitrary payload;
 *   submission entries and ring indices written into the mapped region;
 *   replies read (and their fds closed), a pause, a reconnect.
 *
 * The server must neither crash (ASan/UBSan) nor form a bad batch (the
 * engine aborts), and once the input's connections are closed the process
 * must come back to the fds it had before the input: every fd a client sent
 * is closed (abort() otherwise, after a bounded wait, listing what is
 * open). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "daemon/engine/log.h"
#include "daemon/server/server.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char g_sock[108];
static bool g_started;

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	if (!d)
		abort();
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n - 1; /* the DIR's own */
}

static void *serve(void *arg)
{
	static struct moe_server_opts o;

	(void)arg;
	o = (struct moe_server_opts){
		.socket_path = g_sock,
		.socket_mode = 0600,
		.listen_fd = -1,
		.max_clients = 8,
		.max_client_shm_bytes = 4 << 20,
		.max_total_shm_bytes = 8 << 20,
		.max_inflight_requests = 16,
		.max_inflight_tokens = 256,
		.max_queue_requests = 32,
		.request_timeout_ms = 2000,
		.handshake_timeout_ms = 300,
		.log_level = 2, /* LOG_CRIT: quiet */
	};
	moe_server_run(NULL, &o);
	return NULL;
}

static void start(void)
{
	static char dir[] = "/tmp/moe-fuzz-session-XXXXXX";
	pthread_t th;

	if (g_started)
		return;
	moe_log_set_level(2);
	if (!mkdtemp(dir))
		abort();
	snprintf(g_sock, sizeof(g_sock), "%s/s", dir);
	if (pthread_create(&th, NULL, serve, NULL))
		abort();
	for (int i = 0; i < 2000 && access(g_sock, F_OK); i++)
		usleep(1000);
	usleep(20000);
	g_started = true;
}

static int dial(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

	memcpy(a.sun_path, g_sock, strlen(g_sock) + 1);
	if (s < 0)
		abort();
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(s);
		return -1;
	}
	return s;
}

static void sendfds(int s, const void *buf, size_t len, const int *fds, int n)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 4)];
		struct cmsghdr align;
	} u;
	struct iovec iov = {(void *)buf, len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};

	if (n > 0) {
		struct cmsghdr *cm;

		memset(&u, 0, sizeof(u));
		mh.msg_control = u.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n);
	}
	(void)sendmsg(s, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* Reads what moed sent and closes the fds that came with it. */
static void drain(int s)
{
	for (;;) {
		char buf[MOE_MSG_MAX];
		union {
			char b[CMSG_SPACE(sizeof(int) * 8)];
			struct cmsghdr align;
		} u;
		struct iovec iov = {buf, sizeof(buf)};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				    .msg_controllen = sizeof(u.b)};
		ssize_t n = recvmsg(s, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);

		if (n <= 0)
			return;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_type == SCM_RIGHTS)
				for (size_t k = 0; k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
					int fd;

					memcpy(&fd, CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
					close(fd);
				}
	}
}

struct in {
	const uint8_t *p;
	size_t n;
};

static uint32_t take(struct in *in, int bytes)
{
	uint32_t v = 0;

	for (int i = 0; i < bytes && in->n; i++, in->p++, in->n--)
		v |= (uint32_t)*in->p << (8 * i);
	return v;
}

/* A memfd (or a pipe end, kind 3) for the server to check. */
static int make_fd(uint32_t kind, uint64_t bytes, uint32_t seals, uint32_t entries)
{
	int fd, p[2];

	if ((kind & 3) == 3) {
		if (pipe(p))
			abort();
		close(p[1]);
		return p[0];
	}
	fd = memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, (off_t)bytes))
		abort();
	if (kind & 1) {
		struct moe_shm_hdr h = {.magic = MOE_SHM_MAGIC, .version = MOE_SHM_VERSION,
					.sq_entries = entries, .cq_entries = entries,
					.region_bytes = bytes};

		if (pwrite(fd, &h, offsetof(struct moe_shm_hdr, sq_head), 0) < 0)
			abort();
	}
	if (seals)
		(void)fcntl(fd, F_ADD_SEALS, (int)seals);
	return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = {data, size};
	int s;
	void *map = NULL;
	uint64_t mapped = 0;
	uint32_t entries = 0;
	struct timespec t0, t;
	int base;

	start();
	/* (per input: the sanitizers' symbolizer opens fds of its own when
	 * libFuzzer prints a new function, between inputs) */
	base = count_fds();
	s = dial();
	for (int ops = 0; in.n && ops < 64 && s >= 0; ops++) {
		uint32_t op = take(&in, 1);

		switch (op % 8) {
		case 0: { /* HELLO */
			uint32_t b = take(&in, 2), k = take(&in, 1);
			uint32_t e = 1u << (b % 6), nfd = (k >> 4) % 3;
			uint64_t bytes = (64u << 10) << ((b >> 3) % 4);
			uint32_t seals = (b >> 5) & 7 ? F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
						      : (b >> 8) & (F_SEAL_SHRINK | F_SEAL_GROW);
			struct moe_msg_hello h = {.sq_entries = e, .cq_entries = e << ((b >> 10) & 1),
						  .region_bytes = bytes + ((b >> 11) & 1) * 4096};
			char buf[MOE_MSG_MAX];
			int fds[2];

			strcpy(h.client_name, "fuzz");
			for (uint32_t i = 0; i < nfd; i++)
				fds[i] = make_fd(k, bytes, seals, e);
			if (nfd && !map) {
				map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
				if (map == MAP_FAILED)
					map = NULL;
				mapped = map ? bytes : 0;
				entries = e;
			}
			sendfds(s, buf, moe_msg_encode(buf, MOE_MSG_HELLO, k, &h, sizeof(h)), fds,
				(int)nfd);
			for (uint32_t i = 0; i < nfd; i++)
				close(fds[i]);
			break;
		}
		case 1: { /* arbitrary bytes, 0-3 fds */
			uint32_t len = take(&in, 1) % 200, nfd = take(&in, 1) % 4;
			uint8_t buf[256] = {0};
			int fds[3];

			len = len < in.n ? len : (uint32_t)in.n;
			memcpy(buf, in.p, len);
			in.p += len, in.n -= len;
			for (uint32_t i = 0; i < nfd; i++)
				fds[i] = make_fd(i, 64 << 10, 0, 4);
			sendfds(s, buf, len, fds, (int)nfd);
			for (uint32_t i = 0; i < nfd; i++)
				close(fds[i]);
			break;
		}
		case 2: { /* a framed message of any type */
			uint32_t type = take(&in, 1) % 12, len = take(&in, 1) % 64;
			uint8_t pay[64] = {0};
			char buf[MOE_MSG_MAX];

			len = len < in.n ? len : (uint32_t)in.n;
			memcpy(pay, in.p, len);
			in.p += len, in.n -= len;
			sendfds(s, buf, moe_msg_encode(buf, (uint16_t)type, 1, pay, len), NULL, 0);
			break;
		}
		case 3: /* submission entries, then the tail and a doorbell */
			if (map && entries) {
				struct moe_shm_layout lay;
				uint32_t k = take(&in, 1) % 8, tail;

				if (moe_shm_layout(entries, entries, mapped, &lay) == 0) {
					struct moe_sqe *sq = (struct moe_sqe *)((char *)map + lay.sq_off);
					struct moe_shm_hdr *h = map;

					tail = atomic_load(&h->sq_tail);
					for (uint32_t i = 0; i < k; i++) {
						struct moe_sqe q = {.tag = take(&in, 2),
								    .layer = take(&in, 1) % 4,
								    .n_tokens = take(&in, 1) % 80,
								    .in_off = (uint64_t)take(&in, 2) * 64,
								    .out_off = (uint64_t)take(&in, 2) * 64,
								    .dtype = (uint16_t)(take(&in, 1) % 4),
								    .flags = (uint16_t)(take(&in, 1) % 3),
								    .timeout_ms = take(&in, 1)};

						sq[(tail + i) & (entries - 1)] = q;
					}
					atomic_store(&h->sq_tail, tail + k);
				}
				{
					char buf[MOE_MSG_MAX];

					sendfds(s, buf, moe_msg_encode(buf, MOE_MSG_DOORBELL, 0, NULL, 0),
						NULL, 0);
				}
			}
			break;
		case 4: /* indices that lie */
			if (map) {
				struct moe_shm_hdr *h = map;
				uint32_t v = take(&in, 4);

				switch (take(&in, 1) % 3) {
				case 0:
					atomic_store(&h->sq_tail, v);
					break;
				case 1:
					atomic_store(&h->cq_head, v);
					break;
				default:
					atomic_store(&h->sq_head, v);
				}
			}
			break;
		case 5:
			drain(s);
			break;
		case 6:
			usleep(200 * (take(&in, 1) % 8));
			break;
		default: /* hang up and call again */
			drain(s);
			close(s);
			s = dial();
		}
	}
	if (s >= 0) {
		usleep(1000);
		drain(s);
		close(s);
	}
	if (map)
		munmap(map, mapped);
	/* every fd the server received is closed once it dropped us */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (count_fds() > base) {
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 3) {
			DIR *d = opendir("/proc/self/fd");
			struct dirent *e;

			fprintf(stderr, "fuzz_session: %d fds open, %d before:\n", count_fds(), base);
			while (d && (e = readdir(d))) {
				char p[300], l[300] = "";

				snprintf(p, sizeof(p), "/proc/self/fd/%s", e->d_name);
				if (readlink(p, l, sizeof(l) - 1) > 0)
					fprintf(stderr, "  %s -> %s\n", e->d_name, l);
			}
			abort();
		}
		usleep(500);
	}
	return 0;
}
