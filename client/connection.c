/* client/connection.c — connecting: the socket's datagrams, the handshake, the shared
 * region, reconnecting, creating and freeing a client (see internal.h). */
#include "client/internal.h"

/* Receives one datagram without blocking. Returns its length, 0 at EOF, or
 * a negative errno; attached descriptors (close-on-exec) go to fds. */
ssize_t mc_recv_msg(int sock, void *buf, size_t cap, int *fds, int *n_fds)
{
	union {
		char b[CMSG_SPACE(4 * sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {buf, cap};
	struct msghdr mh = {.msg_iov = &iov,
	                    .msg_iovlen = 1,
	                    .msg_control = ctl.b,
	                    .msg_controllen = sizeof(ctl.b)};
	ssize_t n;

	*n_fds = 0;
	do
		n = recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

		for (size_t i = 0; i < k && *n_fds < 4; i++)
			memcpy(&fds[(*n_fds)++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
	}
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		close_fds(fds, *n_fds);
		*n_fds = 0;
		return -EPROTO;
	}
	return n;
}

/* Sends one datagram (and fd if >= 0) without ever blocking longer than
 * wait_ms for room; wait_ms 0 drops it when the socket is full (doorbells).
 * 0 or a negative errno. */
int mc_send_dgram(int sock, const void *buf, size_t len, int fd, int wait_ms)
{
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {(void *)buf, len};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	uint64_t deadline = deadline_after(wait_ms);

	if (fd >= 0) {
		memset(&ctl, 0, sizeof(ctl));
		mh.msg_control = ctl.b;
		mh.msg_controllen = sizeof(ctl.b);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);

		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	for (;;) {
		if (sendmsg(sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		if (!wait_ms)
			return 0; /* a doorbell already pending does the job */
		int left = ms_left(deadline, -1);
		struct pollfd p = {sock, POLLOUT, 0};

		if (!left)
			return -ETIMEDOUT;
		if (poll(&p, 1, left) < 0 && errno != EINTR)
			return -errno;
	}
}

struct conn {
	int sock;
	void *map; /* the new region, mapped anywhere */
	struct moe_shm_layout lay;
	struct moe_msg_hello_reply reply;
};

/* Waits for the HELLO reply. */
static int read_reply(int sock, struct moe_msg_hello_reply *reply, char *err, size_t errlen,
                      const char *path)
{
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	uint64_t deadline = deadline_after(HANDSHAKE_MS);

	for (;;) {
		struct pollfd p = {sock, POLLIN, 0};
		int fds[4], n_fds, r, left = ms_left(deadline, -1);
		struct moe_msg_hdr h;
		struct moe_msg_error e;
		ssize_t n;

		if (!left) {
			set_err(err, errlen, "%s: no answer to the handshake in %d s", path,
			        HANDSHAKE_MS / 1000);
			return MOE_EDAEMON;
		}
		r = poll(&p, 1, left);
		if (r < 0 && errno != EINTR)
			return MOE_EDAEMON;
		if (r <= 0)
			continue;
		n = mc_recv_msg(sock, buf.b, sizeof(buf.b), fds, &n_fds);
		if (n == -EAGAIN || n == -EWOULDBLOCK || n == -ECONNRESET)
			continue;
		if (n <= 0) {
			set_err(err, errlen,
			        "%s: the daemon closed the connection during the handshake", path);
			return MOE_EDAEMON;
		}
		close_fds(fds, n_fds);
		switch (moe_msg_peek(buf.b, (size_t)n, &h)) {
		case MOE_MSG_HELLO_REPLY:
			r = moe_msg_decode_hello_reply(buf.b, (size_t)n, reply);
			if (r) {
				set_err(err, errlen, "%s: malformed handshake reply", path);
				return r;
			}
			if (reply->status) {
				r = wire_status(reply->status);
				set_err(err, errlen, "%s: the daemon refused the client: %s", path,
				        moe_strerror(r));
				return r;
			}
			return 0;
		case MOE_MSG_ERROR:
			if (moe_msg_decode_error(buf.b, (size_t)n, &e))
				return MOE_EPROTO;
			r = wire_status(e.status);
			set_err(err, errlen, "%s: the daemon refused the client: %s (%s)", path,
			        e.message, moe_strerror(r));
			return r;
		case MOE_MSG_DOORBELL:
			continue;
		default:
			set_err(err, errlen, "%s: protocol error during the handshake", path);
			return MOE_EPROTO;
		}
	}
}

/* Connects, creates and maps a new region, and shakes hands. On success
 * *k holds the socket and the new mapping; the caller installs them. */
static int open_conn(const struct moe_client *c, struct conn *k, char *err, size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct moe_msg_hello hello = {0};
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	struct moe_shm_hdr *hdr;
	int memfd = -1, r, e;
	size_t n;

	memset(k, 0, sizeof(*k));
	k->sock = -1;
	k->map = MAP_FAILED;
	r = moe_shm_layout(c->depth, c->depth, c->region_bytes, &k->lay);
	if (r) {
		set_err(err, errlen, "region of %llu bytes too small for %u ring entries",
		        (unsigned long long)c->region_bytes, c->depth);
		return r;
	}
	if (strlen(c->path) >= sizeof(sa.sun_path)) {
		set_err(err, errlen, "%s: socket path too long", c->path);
		errno = ENAMETOOLONG;
		return MOE_EINVAL;
	}
	strcpy(sa.sun_path, c->path);
	/* A daemon that is starting has no socket file yet (ENOENT) or a
	 * full backlog (EAGAIN); one that restarts refuses for a moment
	 * (ECONNREFUSED): within connect_timeout_ms, try again. */
	for (uint64_t t_end = now_ns() + (uint64_t)c->connect_timeout_ms * 1000000u;;) {
		struct timespec nap = {0, 10 * 1000000};

		k->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
		if (k->sock < 0) {
			e = errno;
			set_err(err, errlen, "socket: %s", strerror(e));
			r = MOE_EDAEMON;
			goto err_errno;
		}
		if (connect(k->sock, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		e = errno;
		if ((e != ENOENT && e != ECONNREFUSED && e != EAGAIN) || now_ns() >= t_end) {
			set_err(err, errlen, "%s: connect: %s%s", c->path, strerror(e),
				c->connect_timeout_ms ? " (retried for connect_timeout_ms)" : "");
			r = e == EACCES || e == EPERM ? MOE_EPERM : MOE_EDAEMON;
			goto err_errno;
		}
		close(k->sock);
		k->sock = -1;
		nanosleep(&nap, NULL);
	}

	memfd = memfd_create(c->name[0] ? c->name : "moeclient", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (memfd < 0 || ftruncate(memfd, (off_t)c->region_bytes) < 0 ||
	    fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		e = errno;
		set_err(err, errlen, "shared region of %llu bytes: %s",
		        (unsigned long long)c->region_bytes, strerror(e));
		r = MOE_ENOMEM;
		goto err_errno;
	}
	k->map = mmap(NULL, c->region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (k->map == MAP_FAILED) {
		e = errno;
		set_err(err, errlen, "mmap of the shared region: %s", strerror(e));
		r = MOE_ENOMEM;
		goto err_errno;
	}
	hdr = k->map;
	hdr->magic = MOE_SHM_MAGIC;
	hdr->version = MOE_SHM_VERSION;
	hdr->sq_entries = c->depth;
	hdr->cq_entries = c->depth;
	hdr->region_bytes = c->region_bytes;
	/* Indices are 0 in a fresh memfd. */

	hello.sq_entries = c->depth;
	hello.cq_entries = c->depth;
	hello.region_bytes = c->region_bytes;
	memcpy(hello.client_name, c->name, sizeof(hello.client_name) - 1);
	n = moe_msg_encode(buf.b, MOE_MSG_HELLO, 0, &hello, sizeof(hello));
	r = mc_send_dgram(k->sock, buf.b, n, memfd, HANDSHAKE_MS);
	if (r == -EPIPE || r == -ECONNRESET) {
		/* refused before it read our HELLO: its reason may be queued */
		r = read_reply(k->sock, &k->reply, err, errlen, c->path);
		if (!r)
			r = MOE_EPROTO;
		goto err_close;
	}
	if (r < 0) {
		set_err(err, errlen, "%s: sending the handshake: %s", c->path, strerror(-r));
		r = MOE_EDAEMON;
		goto err_close;
	}
	close(memfd);
	memfd = -1;
	r = read_reply(k->sock, &k->reply, err, errlen, c->path);
	if (r)
		goto err_close;
	if (k->reply.proto_version != MOE_PROTO_VERSION) {
		set_err(err, errlen, "%s: protocol version %u, this library speaks %u", c->path,
		        k->reply.proto_version, MOE_PROTO_VERSION);
		r = MOE_EPROTO;
		goto err_close;
	}
	if (k->reply.data_off < k->lay.data_off || k->reply.data_off % MOE_SHM_ALIGN ||
	    !moe_span_ok(k->reply.data_off, k->reply.data_bytes, c->region_bytes) ||
	    (c->data_bytes &&
	     (k->reply.data_off != c->data_off || k->reply.data_bytes != c->data_bytes))) {
		set_err(err, errlen, "%s: the daemon placed the data area at %llu+%llu", c->path,
		        (unsigned long long)k->reply.data_off,
		        (unsigned long long)k->reply.data_bytes);
		r = MOE_EPROTO;
		goto err_close;
	}
	return 0;

err_errno:
	if (memfd >= 0)
		close(memfd);
	if (k->map != MAP_FAILED)
		munmap(k->map, c->region_bytes);
	if (k->sock >= 0)
		close(k->sock);
	errno = e;
	return r;
err_close:
	if (memfd >= 0)
		close(memfd);
	munmap(k->map, c->region_bytes);
	close(k->sock);
	return r;
}

static void set_info(struct moe_client *c, const struct moe_msg_hello_reply *r)
{
	moe_model_info *mi = &c->info;

	memset(mi, 0, sizeof(*mi));
	memcpy(mi->family, r->family, sizeof(mi->family));
	mi->family[sizeof(mi->family) - 1] = '\0';
	mi->hidden = r->hidden;
	mi->n_experts = r->n_experts;
	mi->top_k = r->top_k;
	mi->n_layers = r->n_layers;
	mi->n_moe_layers = r->n_moe_layers;
	memcpy(mi->moe_layers, r->moe_layers, r->n_moe_layers * sizeof(mi->moe_layers[0]));
	mi->dtype = (moe_dtype)r->dtype;
	mi->max_batch_tokens = r->max_batch_tokens;
	mi->max_inflight_requests = r->max_inflight_requests;
	mi->max_inflight_tokens = r->max_inflight_tokens;
	mi->data_bytes = r->data_bytes;
}

/* Makes k the client's connection. On a reconnection the new region takes
 * the old one's address (MAP_FIXED), with the live buffers copied over, so
 * that pointers from moe_buf_alloc stay valid. */
static int install(struct moe_client *c, struct conn *k)
{
	unsigned char *base;

	mc_trace_reset(c); /* a new session traces nothing */
	if (c->region) {
		const unsigned char *old = (unsigned char *)c->region + c->data_off;
		unsigned char *nu = (unsigned char *)k->map + c->data_off;
		void *p;

		for (size_t i = 0; i < c->alloc.n_used; i++)
			memcpy(nu + c->alloc.used[i].off, old + c->alloc.used[i].off,
			       c->alloc.used[i].len);
		p = mremap(k->map, c->region_bytes, c->region_bytes, MREMAP_MAYMOVE | MREMAP_FIXED,
		           c->region);
		if (p == MAP_FAILED) {
			munmap(k->map, c->region_bytes);
			close(k->sock);
			return MOE_ENOMEM;
		}
	} else {
		if (moe_shm_alloc_init(&c->alloc, k->reply.data_bytes)) {
			munmap(k->map, c->region_bytes);
			close(k->sock);
			return MOE_ENOMEM;
		}
		c->region = k->map;
		c->data_off = k->reply.data_off;
		c->data_bytes = k->reply.data_bytes;
	}
	base = c->region;
	c->hdr = c->region;
	c->sq = (struct moe_sqe *)(base + k->lay.sq_off);
	c->cq = (struct moe_cqe *)(base + k->lay.cq_off);
	c->data = base + c->data_off;
	c->sq_entries = c->cq_entries = c->depth;
	c->sq_tail = c->cq_head = 0;
	c->sock = k->sock;
	c->dead = 0;
	c->inflight_reqs = c->inflight_tokens = 0;
	set_info(c, &k->reply);
	return 0;
}

/* With c->mu held and c->dead: connects again. */
static int reconnect_locked(struct moe_client *c)
{
	struct conn k;
	int r;

	while (c->polling) /* the poller closes the old socket on waking */
		pthread_cond_wait(&c->cv, &c->mu);
	if (!c->dead)
		return 0; /* another thread did it meanwhile */
	if (c->sock >= 0) {
		close(c->sock);
		c->sock = -1;
	}
	r = open_conn(c, &k, NULL, 0);
	if (r)
		return r == MOE_EPERM || r == MOE_EPROTO || r == MOE_ELIMIT ? r : MOE_EDAEMON;
	r = install(c, &k);
	mc_wake_all(c);
	return r;
}

/* Every call that talks to the daemon starts here (c->mu held). */
int mc_enter(struct moe_client *c)
{
	if (!c->dead)
		return 0;
	return c->auto_reconnect ? reconnect_locked(c) : MOE_EDAEMON;
}

static void client_free(struct moe_client *c)
{
	if (c->sock >= 0)
		close(c->sock);
	if (c->evfd >= 0)
		close(c->evfd);
	mc_calls_fail(c);
	if (c->region)
		munmap(c->region, c->region_bytes);
	moe_shm_alloc_fini(&c->alloc);
	pthread_cond_destroy(&c->cv);
	pthread_mutex_destroy(&c->mu);
	free(c->slots);
	free(c->free_slots);
	free(c->trace.q);
	free(c->path);
	free(c);
}

MOE_API int moe_connect_opts(const char *socket_path, const moe_connect_options *o,
                             moe_client **out)
{
	static const moe_connect_options defaults;
	struct moe_client *c;
	pthread_condattr_t ca;
	struct conn k;
	const char *name;
	int r, e;
	long page = sysconf(_SC_PAGESIZE);

	if (!out)
		return MOE_EINVAL;
	*out = NULL;
	if (!o)
		o = &defaults;
	if (!socket_path || !*socket_path)
		socket_path = getenv("MOED_SOCKET");
	if (!socket_path || !*socket_path)
		socket_path = DEFAULT_SOCKET;
	if (o->queue_depth > MOE_RING_MAX || o->region_bytes > ((uint64_t)1 << 40)) {
		set_err(o->errbuf, o->errbuf_len, "queue depth or region size out of range");
		return MOE_EINVAL;
	}
	for (size_t i = 0; i < sizeof(o->reserved) / sizeof(o->reserved[0]); i++) {
		if (o->reserved[i]) {
			set_err(o->errbuf, o->errbuf_len, "reserved option words must be zero");
			return MOE_EINVAL;
		}
	}

	c = calloc(1, sizeof(*c));
	if (!c)
		return MOE_ENOMEM;
	c->sock = c->evfd = -1;
	for (int i = 0; i < MAX_CALLS; i++)
		c->calls[i].fd = -1;
	pthread_mutex_init(&c->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cv, &ca);
	pthread_condattr_destroy(&ca);
	c->path = strdup(socket_path);
	c->depth = pow2_at_least(o->queue_depth ? o->queue_depth : DEFAULT_DEPTH);
	c->region_bytes = o->region_bytes ? o->region_bytes : DEFAULT_REGION;
	c->region_bytes = (c->region_bytes + (uint64_t)page - 1) & ~((uint64_t)page - 1);
	c->auto_reconnect = o->auto_reconnect != 0;
	c->connect_timeout_ms = o->connect_timeout_ms;
	name = o->name && *o->name ? o->name : program_invocation_short_name;
	snprintf(c->name, sizeof(c->name), "%s", name ? name : "");
	c->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	c->slots = calloc(c->depth, sizeof(*c->slots));
	c->free_slots = malloc(c->depth * sizeof(*c->free_slots));
	if (!c->path || c->evfd < 0 || !c->slots || !c->free_slots) {
		set_err(o->errbuf, o->errbuf_len, "out of memory");
		r = MOE_ENOMEM;
		goto err_free;
	}
	for (uint32_t i = 0; i < c->depth; i++)
		c->free_slots[i] = c->depth - 1 - i;
	c->n_free_slots = c->depth;
	c->cq_entries = c->depth;

	r = open_conn(c, &k, o->errbuf, o->errbuf_len);
	if (r)
		goto err_free;
	r = install(c, &k);
	if (r)
		goto err_free;
	*out = c;
	return 0;

err_free:
	e = errno;
	client_free(c);
	errno = e;
	return r;
}

MOE_API int moe_connect(const char *socket_path, moe_client **out)
{
	return moe_connect_opts(socket_path, NULL, out);
}

MOE_API void moe_disconnect(moe_client *c)
{
	if (c)
		client_free(c);
}

MOE_API int moe_reconnect(moe_client *c)
{
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = c->dead ? reconnect_locked(c) : 0;
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_get_model_info(moe_client *c, moe_model_info *info)
{
	int r;

	if (!c || !info)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = mc_enter(c);
	if (!r)
		*info = c->info;
	pthread_mutex_unlock(&c->mu);
	return r;
}
