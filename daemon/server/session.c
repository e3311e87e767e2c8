/* daemon/server/session.c — sessions: accept, the handshake and the shared region, messages,
 * hang-ups
 * (see internal.h). */
#include "daemon/server/internal.h"

/* ---- sessions ----------------------------------------------------------- */

/* Drops a session: unlinks it, answers nothing more, frees what it had
 * queued and closes its socket. Requests of it inside a batch keep it (and
 * its region) alive until they come back: srv_client_put frees it then. */
void srv_drop_client(struct server *s, struct client *c)
{
	struct client **pp = &s->clients;

	while (*pp && *pp != c)
		pp = &(*pp)->next;
	if (*pp)
		*pp = c->next;
	while (c->queue) {
		struct request *r = c->queue;

		c->queue = r->next;
		s->queued--;
		s->pending--;
		s->pending_tokens -= r->n_tokens;
		c->inflight--;
		c->inflight_tokens -= r->n_tokens;
		free(r);
	}
	c->queue_tail = NULL;
	if (c->tracing)
		srv_trace_drop(s, c);
	epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
	/* the worker may be ringing its doorbell: gone and the socket change
	 * together under cq_lock */
	pthread_mutex_lock(&c->cq_lock);
	close(c->fd);
	c->fd = -1;
	c->gone = true;
	pthread_mutex_unlock(&c->cq_lock);
	c->dead = true;
	if (c->pin_failed)
		s->unpinned--;
	/* Counted out of server.max_total_shm_bytes now, so that a client
	 * replacing it finds room at once; the mapping itself goes once the
	 * worker has let go of it (at most two batches later). */
	if (c->region)
		s->shm_bytes -= c->region_bytes;
	/* (one that never attached was logged when refused, if at all) */
	moe_log(c->attached ? LOG_INFO : LOG_DEBUG, "client %u (pid %d, %s) disconnected after "
		"%llu requests%s", c->id, (int)c->pid, c->name[0] ? c->name : "-",
		(unsigned long long)c->requests,
		c->refs > 1 ? "; its region is released once the engine worker lets go of it"
			    : "");
	s->n_clients--;
	srv_client_put(s, c);
}

/* Drops one reference; the last one frees the client and hands its region
 * to the worker to unpin and unmap (after every batch posted before). */
void srv_client_put(struct server *s, struct client *c)
{
	if (--c->refs)
		return;
	if (c->region) {
		struct work *x = calloc(1, sizeof(*x));

		if (x) {
			*x = (struct work){.kind = WORK_RELEASE, .region = c->region,
					   .bytes = c->region_bytes, .pinned = c->pinned};
			srv_worker_post(&s->w, x);
		} else if (!c->pinned) {
			munmap(c->region, c->region_bytes);
		} /* else: leaked rather than unpinned off the worker */
	}
	free(c->overflow);
	pthread_mutex_destroy(&c->cq_lock);
	free(c);
}

/* The worker's answer to a region's pinning (attach). */
void srv_pin_done(struct server *s, struct work *x)
{
	struct client *c = x->c;

	c->pinned = x->ret == 0;
	if (x->ret && x->ret != -ENOTSUP && !c->gone) {
		/* correct but slower: the driver stages the copies */
		c->pin_failed = true;
		s->unpinned++;
		moe_log(LOG_WARNING, "client %u: cannot pin its %llu-byte region (%s); its "
			"copies to the GPU are staged", c->id, (unsigned long long)x->bytes, x->err);
	}
	free(x);
	srv_client_put(s, c);
}

void srv_accept_clients(struct server *s)
{
	for (;;) {
		int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct epoll_event ev = {.events = EPOLLIN};
		struct client *c;

		if (fd < 0)
			return;
		if (s->stopping || s->n_clients >= s->o.max_clients) {
			struct client tmp = {.fd = fd, .met = &s->met};

			srv_send_error(&tmp, s->stopping ? MOE_ESHUTDOWN : MOE_ELIMIT,
				   s->stopping ? "shutting down" : "too many clients");
			s->refused++;
			close(fd);
			continue;
		}
		c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		pthread_mutex_init(&c->cq_lock, NULL);
		c->refs = 1; /* the session's */
		c->met = &s->met;
		c->id = ++s->next_id;
		c->accepted_ns = srv_now_ns();
		if (moe_auth_peer(fd, &c->peer) == 0) {
			c->pid = c->peer.pid;
			c->uid = c->peer.uid;
		} else {
			c->peer.uid = (uid_t)-1; /* unknown: grants nothing */
			c->peer.gid = (gid_t)-1;
		}
		ev.data.ptr = c;
		if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			close(fd);
			pthread_mutex_destroy(&c->cq_lock);
			free(c);
			continue;
		}
		c->next = s->clients;
		s->clients = c;
		s->n_clients++;
	}
}

static int hello_reply(struct server *s, struct client *c, int status)
{
	struct moe_msg_hello_reply r = {.status = status, .proto_version = MOE_PROTO_VERSION};
	const struct moe_model *m = s->m;

	if (!status) {
		snprintf(r.family, sizeof(r.family), "%s", moe_family_name(m->family));
		r.hidden = m->hidden;
		r.n_experts = m->n_experts;
		r.top_k = m->top_k;
		r.dtype = m->dtype == MOE_DT_F32 ? MOE_WIRE_F32
			  : m->dtype == MOE_DT_BF16 ? MOE_WIRE_BF16 : MOE_WIRE_F16;
		r.n_layers = m->n_layers;
		r.n_moe_layers = m->n_moe_layers < MOE_MAX_MOE_LAYERS ? m->n_moe_layers
								      : MOE_MAX_MOE_LAYERS;
		for (uint32_t i = 0; i < r.n_moe_layers; i++)
			r.moe_layers[i] = (uint16_t)m->layers[i].index;
		r.max_batch_tokens = moe_engine_max_tokens(s->e);
		r.max_inflight_requests = s->o.max_inflight_requests;
		r.max_inflight_tokens = s->o.max_inflight_tokens;
		r.data_off = (uint64_t)(c->data - (char *)c->region);
		r.data_bytes = c->data_bytes;
	}
	return srv_send_msg(c->fd, MOE_MSG_HELLO_REPLY, &r, sizeof(r), -1);
}

/* The memfd is the client's: check its type, seals and size before mapping,
 * then copy the header once and check it against the HELLO.
 *
 * What could make a read or write of the mapped region fault (SIGBUS kills
 * moed, and every client with it) is closed here, not caught later:
 *  - a file that shrinks under the mapping: F_SEAL_SHRINK, and the size
 *    must be the HELLO's;
 *  - pages that cannot be provided on a fault: only shmem (a plain memfd,
 *    fstatfs TMPFS_MAGIC) is accepted. A hugetlbfs memfd (MFD_HUGETLB) can be
 *    sized and sealed with no huge page reserved, and its owner can punch
 *    its pages out and exhaust the pool: moed's next touch is SIGBUS.
 *    Holes punched in a shmem file read as zeros and are allocated again on
 *    write (charged to moed: server.max_total_shm_bytes bounds that);
 *  - a mapping that later turns read-only: F_SEAL_SEAL forbids adding
 *    F_SEAL_WRITE or F_SEAL_FUTURE_WRITE after the check, and a region
 *    sealed against writes already cannot be mapped writable. */
static int attach(struct server *s, struct client *c, const struct moe_msg_hello *h, int fd,
		  const char **why)
{
	struct moe_shm_layout lay;
	struct moe_shm_hdr hdr;
	struct statfs sf;
	struct stat st;
	int seals;
	void *p;

	if (fd < 0)
		return *why = "HELLO without a memfd", MOE_EPROTO;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return *why = "the passed fd is not a regular file (memfd)", MOE_EINVAL;
	if (fstatfs(fd, &sf) < 0 || (uint32_t)sf.f_type != SHMEM_MAGIC)
		return *why = "the memfd is not a plain shmem memfd (hugetlbfs and other "
			      "filesystems can fault moed's reads)",
		       MOE_EINVAL;
	seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0 || (seals & SEALS_NEEDED) != SEALS_NEEDED)
		return *why = "the memfd is not sealed against shrink, grow and further sealing",
		       MOE_EINVAL;
	if ((uint64_t)st.st_size != h->region_bytes)
		return *why = "the memfd's size differs from the HELLO's", MOE_EINVAL;
	if (h->region_bytes > s->o.max_client_shm_bytes || h->region_bytes < MIN_REGION)
		return *why = "region size outside [64 KiB, server.max_client_shm_bytes]",
		       MOE_ELIMIT;
	if (s->o.max_total_shm_bytes && /* (a reload may have lowered it below what is held) */
	    (s->shm_bytes > s->o.max_total_shm_bytes ||
	     h->region_bytes > s->o.max_total_shm_bytes - s->shm_bytes))
		return *why = "server.max_total_shm_bytes: the clients' regions already take "
			      "what moed allows in all",
		       MOE_ELIMIT;
	if (moe_shm_layout(h->sq_entries, h->cq_entries, h->region_bytes, &lay))
		return *why = "ring sizes do not fit the region", MOE_EINVAL;
	p = mmap(NULL, h->region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return *why = "cannot map the memfd", MOE_EINVAL;
	memcpy(&hdr, p, offsetof(struct moe_shm_hdr, sq_head));
	if (hdr.magic != MOE_SHM_MAGIC || hdr.version != MOE_SHM_VERSION ||
	    hdr.sq_entries != h->sq_entries || hdr.cq_entries != h->cq_entries ||
	    hdr.region_bytes != h->region_bytes) {
		munmap(p, h->region_bytes);
		return *why = "region header does not match the HELLO", MOE_EINVAL;
	}
	c->region = p;
	c->region_bytes = h->region_bytes;
	s->shm_bytes += c->region_bytes;
	c->hdr = p;
	c->sq = (struct moe_sqe *)((char *)p + lay.sq_off);
	c->cq = (struct moe_cqe *)((char *)p + lay.cq_off);
	c->data = (char *)p + lay.data_off;
	c->data_bytes = lay.data_bytes;
	c->sq_entries = h->sq_entries;
	c->cq_entries = h->cq_entries;
	/* our own copies of the indices we own; the region's are only hints */
	c->sq_head = atomic_load_explicit(&c->hdr->sq_head, memory_order_relaxed);
	c->cq_tail = atomic_load_explicit(&c->hdr->cq_tail, memory_order_relaxed);
	memcpy(c->name, h->client_name, sizeof(c->name));
	c->attached = true;
	/* Pinning is a device call: the worker does it, before any batch of
	 * this client (FIFO); the client holds a reference until it is done. */
	{
		struct work *x = calloc(1, sizeof(*x));

		if (x) {
			*x = (struct work){.kind = WORK_PIN, .c = c, .region = p,
					   .bytes = h->region_bytes};
			c->refs++;
			srv_worker_post(&s->w, x);
		}
	}
	return 0;
}

/* One datagram (and maybe fds) from a client. Returns false to drop it. */
static bool handle_msg(struct server *s, struct client *c, const char *buf, size_t n, int *fds,
		       int nfds)
{
	struct moe_msg_hdr hdr;
	int type = moe_msg_peek(buf, n, &hdr);
	int passed = nfds == 1 ? fds[0] : -1;
	bool keep = true;

	if (type == MOE_MSG_HELLO && !c->attached) {
		struct moe_msg_hello h;
		const char *why = "malformed HELLO";
		int st = moe_msg_decode_hello(buf, n, &h);

		/* administrators may connect too (their commands need a session) */
		if (!st && !moe_auth_allowed(&s->o.auth, &c->peer, MOE_AUTH_FORWARD) &&
		    !moe_auth_allowed(&s->o.auth, &c->peer, MOE_AUTH_ADMIN)) {
			st = MOE_EPERM,
			why = "not root, the daemon's user, or in the socket's or admin group";
			s->refused_auth++;
		}
		if (!st && nfds != 1)
			st = MOE_EPROTO, why = "HELLO must carry exactly one fd";
		if (!st)
			st = attach(s, c, &h, passed, &why);
		if (st) {
			srv_log_refusal(s, c->peer.uid, "client %u (pid %d, uid %d): refused: %s", c->id,
				    (int)c->pid, (int)c->peer.uid, why);
			hello_reply(s, c, st);
			keep = false;
		} else if (hello_reply(s, c, 0)) {
			keep = false;
		} else {
			moe_log(LOG_INFO, "client %u (pid %d, uid %d, %s) attached %llu bytes",
				c->id, (int)c->pid, (int)c->uid, c->name[0] ? c->name : "-",
				(unsigned long long)c->region_bytes);
		}
	} else if (!c->attached) {
		srv_send_error(c, MOE_EPROTO, "HELLO expected first");
		keep = false;
	} else if (type == MOE_MSG_DOORBELL && !moe_msg_decode_empty(buf, n, MOE_MSG_DOORBELL)) {
		/* the rings are polled right after */
	} else if (type == MOE_MSG_CANCEL) {
		struct moe_msg_cancel m;

		if (moe_msg_decode_cancel(buf, n, &m)) {
			keep = false;
		} else {
			/* the request may still sit in the ring: take it first */
			srv_poll_sq(s, c);
			srv_cancel(s, c, m.tag);
		}
	} else if (type == MOE_MSG_STATUS && !moe_msg_decode_empty(buf, n, MOE_MSG_STATUS)) {
		srv_status_reply(s, c, hdr.seq);
	} else if (type == MOE_MSG_METRICS && !moe_msg_decode_empty(buf, n, MOE_MSG_METRICS)) {
		srv_metrics_reply(s, c, hdr.seq);
	} else if (type == MOE_MSG_ADMIN) {
		srv_admin(s, c, buf, n, hdr.seq); /* a bad one is answered, not dropped */
	} else {
		srv_send_error(c, MOE_EPROTO, "malformed or unexpected message");
		keep = false;
	}
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	if (!keep)
		c->dead = true;
	return keep;
}

/* Messages read from one client per loop iteration, of any kind: what is
 * left stays in its socket until the next iteration (epoll is level-
 * triggered), after the batch in between. A client that floods the socket
 * (STATUS, CANCEL, doorbells) then costs each iteration at most this many
 * cheap messages, and never delays the data path by more. */
#define MSGS_PER_LOOP 8

void srv_read_client(struct server *s, struct client *c)
{
	if (c->ctrl_loop != s->loops) {
		c->ctrl_loop = s->loops;
		c->ctrl_used = 0;
	}
	for (; c->ctrl_used < MSGS_PER_LOOP && !c->dead; c->ctrl_used++) {
		char buf[MOE_MSG_MAX];
		union {
			char b[CMSG_SPACE(sizeof(int) * 8)];
			struct cmsghdr align;
		} u;
		struct iovec iov = {buf, sizeof(buf)};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				    .msg_controllen = sizeof(u.b)};
		int fds[8], nfds = 0;
		ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);

		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n < 0) {
			c->dead = true;
			return;
		}
		/* The fds first, whatever the datagram: a zero-length one can
		 * carry fds too (SOCK_SEQPACKET cannot tell it from EOF), and
		 * every fd received is closed on every path below. */
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			for (size_t k = 0; k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < 8;
			     k++)
				memcpy(&fds[nfds++], CMSG_DATA(cm) + k * sizeof(int), sizeof(int));
		}
		if (n == 0) { /* EOF, or an empty datagram: no message of ours is empty */
			for (int k = 0; k < nfds; k++)
				close(fds[k]);
			c->dead = true;
			return;
		}
		if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
			for (int k = 0; k < nfds; k++)
				close(fds[k]);
			srv_send_error(c, MOE_EPROTO, "message too large");
			c->dead = true;
			return;
		}
		handle_msg(s, c, buf, (size_t)n, fds, nfds);
	}
}
