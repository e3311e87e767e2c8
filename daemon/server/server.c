/* daemon/server/server.c — the serving loop: setup, epoll, signals, the tick, shutdown
 * (see internal.h). */
#include "daemon/server/internal.h"

/* Every timer tick: deadlines, connections that never said HELLO, the
 * watchdog, and the status line. The watchdog is fed while both the loop
 * ticks and the worker's current item (if any) started less than half a
 * watchdog period ago: a batch that wedges stops the pings, and systemd
 * restarts us. */
static void tick(struct server *s)
{
	uint64_t now = srv_now_ns();

	srv_expire(s);
	for (struct client *c = s->clients; c; c = c->next) {
		if (!c->attached && s->o.handshake_timeout_ms &&
		    now - c->accepted_ns > s->o.handshake_timeout_ms * 1000000ull) {
			srv_log_refusal(s, c->peer.uid, "client %u (pid %d): no HELLO within %u ms; "
				    "dropped", c->id, (int)c->pid, s->o.handshake_timeout_ms);
			srv_send_error(c, MOE_EPROTO, "handshake timeout");
			c->dead = true;
		}
	}
	srv_log_flush(s, now);
	if (s->trace.n)
		srv_trace_flush(s, true);
	if (s->watchdog_ns && now - s->last_ping_ns >= s->watchdog_ns / 2 &&
	    !srv_worker_wedged(&s->w, now, s->watchdog_ns / 2)) {
		srv_notify("WATCHDOG=1");
		s->last_ping_ns = now;
	}
	if (now - s->last_status_ns >= 5000000000ull) {
		srv_status_line(s);
		s->last_status_ns = now;
	}
	srv_auto_rebalance(s);
}

/* The timer is one-shot: at the end of each loop iteration it is armed for
 * the first moment the tick has work (the earliest deadline of a queued
 * request or of a handshake, the watchdog's next ping; every TICK_NS while
 * a tracer is attached, whose flush may wait for the tick), at least TICK_NS
 * and at most TICK_IDLE_NS away (what has no deadline of its own: the
 * status line, log summaries, automatic rebalancing, checked at that
 * rate). A fixed 10 ms period woke the loop 100 times a second whatever
 * it had to do: on a 2-vCPU host serving 16 clients those wake-ups were
 * more than half of the loop's, each taking a CPU from the worker or its
 * helpers in the middle of a batch; without them that load ran faster and
 * its p99 fell (bench/RESULTS.md, session 13). Deadlines still expire
 * within TICK_NS of their time, as before. */
#define TICK_IDLE_NS (100 * 1000000ull)

static uint64_t tick_due(const struct server *s, uint64_t now)
{
	uint64_t due = now + (s->trace.n ? TICK_NS : TICK_IDLE_NS);

	for (const struct client *c = s->clients; c; c = c->next) {
		if (!c->attached && s->o.handshake_timeout_ms &&
		    c->accepted_ns + s->o.handshake_timeout_ms * 1000000ull < due)
			due = c->accepted_ns + s->o.handshake_timeout_ms * 1000000ull;
		for (const struct request *r = c->queue; r; r = r->next)
			if (r->deadline_ns && r->deadline_ns < due)
				due = r->deadline_ns;
	}
	if (s->watchdog_ns && s->last_ping_ns + s->watchdog_ns / 2 < due)
		due = s->last_ping_ns + s->watchdog_ns / 2;
	return due < now + TICK_NS ? now + TICK_NS : due;
}

/* Arms the timer unless it is armed for sooner already (then it fires,
 * ticks and is armed again). Called on every iteration: when the timer is
 * due within TICK_NS (no due time comes sooner) the queues are not walked. */
static void arm_tick(struct server *s)
{
	uint64_t now = srv_now_ns(), due;
	struct itimerspec its = {{0, 0}, {0, 0}};

	if (s->tick_armed_ns && s->tick_armed_ns <= now + TICK_NS)
		return;
	due = tick_due(s, now);
	if (s->tick_armed_ns && s->tick_armed_ns <= due)
		return;
	its.it_value = (struct timespec){(time_t)(due / 1000000000u), (long)(due % 1000000000u)};
	if (timerfd_settime(s->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
		s->tick_armed_ns = due;
}

/* ---- setup -------------------------------------------------------------- */

/* Binds the socket; a stale socket file (nobody listening) is replaced, a
 * live one is an error: two daemons must not share a path.
 *
 * The path appears only once the socket listens: it is bound under a
 * temporary name in the same directory, given its group and mode, put in
 * the listening state, and renamed over the path (rename is atomic), so a
 * client that waits for the file and then connects is never refused. */
static int listen_on(const char *path, unsigned mode, const struct moe_auth_policy *auth)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX}, tmp = {.sun_family = AF_UNIX};
	int fd, probe, n;

	if (strlen(path) >= sizeof(a.sun_path)) {
		moe_log(LOG_ERR, "%s: socket path too long", path);
		return -1;
	}
	strcpy(a.sun_path, path);
	n = snprintf(tmp.sun_path, sizeof(tmp.sun_path), "%s.%d~", path, (int)getpid());
	if (n < 0 || (size_t)n >= sizeof(tmp.sun_path)) {
		moe_log(LOG_ERR, "%s: socket path too long (moed binds \"PATH.PID~\" first, "
			"then renames it: at most %zu characters)", path,
			sizeof(tmp.sun_path) - 10);
		return -1;
	}
	probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof(a)) == 0) {
		close(probe);
		moe_log(LOG_ERR, "%s: another daemon is listening on this socket", path);
		return -1;
	}
	if (probe >= 0)
		close(probe);
	unlink(tmp.sun_path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&tmp, sizeof(tmp)) < 0 ||
	    (auth->has_socket_gid && chown(tmp.sun_path, (uid_t)-1, auth->socket_gid) < 0) ||
	    chmod(tmp.sun_path, mode) < 0 || listen(fd, 128) < 0 ||
	    rename(tmp.sun_path, path) < 0) {
		moe_log(LOG_ERR, "%s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		unlink(tmp.sun_path);
		return -1;
	}
	return fd;
}

static int setup(struct server *s)
{
	struct epoll_event ev = {.events = EPOLLIN};
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	s->sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	s->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	s->epfd = epoll_create1(EPOLL_CLOEXEC);
	s->lfd = s->o.listen_fd >= 0 ? s->o.listen_fd
				     : listen_on(s->o.socket_path, s->o.socket_mode, &s->o.auth);
	if (s->sfd < 0 || s->tfd < 0 || s->epfd < 0 || s->lfd < 0)
		return -1;
	/* Forward requests are for the socket's group: learn it from the
	 * socket file (ours, or systemd's with socket activation). */
	if (!s->o.auth.has_socket_gid) {
		struct sockaddr_un a;
		socklen_t alen = sizeof(a);
		struct stat st;

		/* (ours is bound under a temporary name, then renamed:
		 * getsockname would name the temporary) */
		const char *path = s->o.listen_fd < 0 ? s->o.socket_path : NULL;

		if (!path && getsockname(s->lfd, (struct sockaddr *)&a, &alen) == 0 &&
		    alen > offsetof(struct sockaddr_un, sun_path) && a.sun_path[0])
			path = a.sun_path;
		if (path && stat(path, &st) == 0) {
			s->o.auth.socket_gid = st.st_gid;
			s->o.auth.has_socket_gid = true;
		}
	}
	s->o.auth.daemon_uid = geteuid();
#ifdef MOE_HAVE_SYSTEMD
	{
		uint64_t usec = 0;

		if (sd_watchdog_enabled(0, &usec) > 0)
			s->watchdog_ns = usec * 1000;
	}
#endif
	if (s->o.test_stall_ms)
		moe_log(LOG_WARNING, "test hook MOED_TEST_STALL_MS: every batch sleeps %u ms",
			s->o.test_stall_ms);
	arm_tick(s);
	ev.data.ptr = &s->lfd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->lfd, &ev);
	ev.data.ptr = &s->sfd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->sfd, &ev);
	ev.data.ptr = &s->tfd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->tfd, &ev);
	/* a request has at least one token: max_tokens bounds a batch's requests */
	for (int i = 0; i < 2; i++) {
		s->batch[i].reqs = malloc((size_t)moe_engine_max_tokens(s->e) *
					  sizeof(*s->batch[i].reqs));
		s->batch[i].segs = malloc((size_t)moe_engine_max_tokens(s->e) *
					  sizeof(*s->batch[i].segs));
		s->batch[i].hit_off = malloc(((size_t)moe_engine_max_tokens(s->e) + 1) *
					     sizeof(*s->batch[i].hit_off));
		if (!s->batch[i].reqs || !s->batch[i].segs || !s->batch[i].hit_off)
			return -1;
	}
	s->is_moe = calloc(s->m->n_layers, 1);
	if (!s->is_moe)
		return -1;
	if (met_init(&s->met, s->e, s->o.metrics_per_expert, s->o.metrics_slo_ms))
		return -1;
	if (srv_worker_start(&s->w, s->e, &s->met, s->o.test_stall_ms) < 0 ||
	    srv_jobs_init(s) < 0)
		return -1;
	if (s->o.metrics_listen && s->o.metrics_listen[0]) {
		char err[256];

		if (met_http_start(&s->met, s->o.metrics_listen, &s->http, s->metrics_addr,
				   sizeof(s->metrics_addr), err, sizeof(err))) {
			moe_log(LOG_ERR, "%s", err);
			return -1; /* (errno: why) */
		}
		moe_log(LOG_INFO, "metrics on http://%s/metrics", s->metrics_addr);
	}
	ev.data.ptr = &s->w.efd;
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->w.efd, &ev);
	for (uint32_t i = 0; i < s->m->n_moe_layers; i++)
		s->is_moe[s->m->layers[i].index] = 1;
	return 0;
}

static void reap_dead(struct server *s)
{
	for (struct client *c = s->clients, *next; c; c = next) {
		next = c->next;
		if (c->dead)
			srv_drop_client(s, c);
	}
}

static void on_signal(struct server *s)
{
	struct signalfd_siginfo si;

	while (read(s->sfd, &si, sizeof(si)) == sizeof(si)) {
		if (si.ssi_signo == SIGHUP) {
			char msg[240];

			srv_reload_config(s, msg, sizeof(msg));
			continue;
		}
		if (!s->stopping)
			moe_log(LOG_NOTICE, "signal %u: stopping (%u requests queued)", si.ssi_signo,
				s->pending);
		s->stopping = true;
	}
}

/* Answers everything queued, then everything still in the rings, with
 * MOE_ESHUTDOWN (as far as each client's completion ring has room). */
static void shutdown_clients(struct server *s)
{
	for (struct client *c = s->clients; c; c = c->next) {
		while (c->queue) {
			struct request *r = c->queue;

			srv_unqueue(s, c, r);
			srv_finish(s, r, s->lost ? MOE_EDEVICE : MOE_ESHUTDOWN, 0);
		}
		for (int i = 0; i < 4 && !c->dead; i++) {
			srv_flush_cq(c);
			srv_poll_sq(s, c); /* stopping: every entry is answered at once */
		}
	}
	srv_notify_clients(s);
}

int moe_server_run(struct moe_engine *e, const struct moe_server_opts *o)
{
	struct server s = {.e = e, .m = moe_engine_model(e), .o = *o, .epfd = -1, .lfd = -1,
			   .sfd = -1, .tfd = -1, .status_fd = -1, .metrics_fd = -1, .w.efd = -1,
			   .jobs_efd = -1,
			   .share = o->max_queue_requests ? o->max_queue_requests : 1,
			   .last_device_ms = -1.0f};
	struct epoll_event evs[64];
	int code = 0;

	s.start_ns = srv_now_ns();
	if (setup(&s)) {
		moe_log(LOG_ERR, "cannot start serving: %s", strerror(errno));
		code = 1;
		goto out;
	}
	moe_log(LOG_INFO, "serving %s on %s (%s backend, %s kernels, %u threads)",
		moe_family_name(s.m->family),
		o->listen_fd >= 0 ? "the socket systemd passed" : o->socket_path,
		moe_engine_backend(e), moe_engine_kernels(e), moe_engine_threads(e));
	s.last_ping_ns = s.last_status_ns = srv_now_ns();
	srv_notify("READY=1");
	srv_status_line(&s);
	/* Stopping waits for the batches the worker holds: their requests are
	 * answered as they come back, never abandoned mid-write. */
	while (!s.stopping || s.batches_out) {
		/* Blocks whatever is queued: a batch slot frees when the
		 * worker hands a batch back, and the waiting batch starts when
		 * the worker says so (want_start), both through the eventfd. */
		int n = epoll_wait(s.epfd, evs, 64, -1);

		s.loops++;
		/* Finished batches first: their completions are already in the
		 * clients' rings (the worker posts them), so a message a client
		 * sends after seeing one (status, drain) must find the loop's
		 * counts already past that batch. */
		for (int i = 0; i < n; i++)
			if (evs[i].data.ptr == &s.w.efd)
				srv_collect(&s);
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;
			uint64_t ticks;

			if (p == &s.w.efd) {
				/* (collected above) */
			} else if (p == &s.lfd) {
				srv_accept_clients(&s);
			} else if (p == &s.sfd) {
				on_signal(&s);
			} else if (p == &s.tfd) {
				if (read(s.tfd, &ticks, sizeof(ticks)) > 0) {
					s.tick_armed_ns = 0; /* (one-shot: spent) */
					tick(&s);
				}
			} else if (p == &s.jobs_efd) {
				srv_jobs_collect(&s);
			} else {
				struct client *c = p;

				if (evs[i].events & EPOLLIN)
					srv_read_client(&s, c);
				if (evs[i].events & (EPOLLHUP | EPOLLERR))
					c->dead = true;
			}
		}
		reap_dead(&s);
		if (s.batches_out < 2) /* (before the rings are read: io.c) */
			srv_need_doorbells(&s, true);
		srv_poll_rings(&s);
		if (s.queued && !s.stopping) {
			/* a request whose deadline passed before it is handed
			 * to the worker is answered, not run; with both batch
			 * slots taken this tops up the one not yet started */
			srv_expire(&s);
			srv_submit_batch(&s);
		}
		if (s.batches_out == 2 && !s.stopping)
			srv_need_doorbells(&s, false);
		srv_answer_drain_waiters(&s);
		srv_notify_clients(&s);
		if (s.trace.n)
			srv_trace_flush(&s, false);
		reap_dead(&s);
		srv_metrics_sync(&s);
		if (s.status_fd >= 0) { /* valid for this iteration only */
			close(s.status_fd);
			s.status_fd = -1;
		}
		if (s.metrics_fd >= 0) {
			close(s.metrics_fd);
			s.metrics_fd = -1;
		}
		arm_tick(&s);
	}
	srv_notify("STOPPING=1");
	shutdown_clients(&s);
	if (s.lost)
		code = MOE_EXIT_DEVICE_LOST;
	moe_log(LOG_NOTICE, "stopped: %llu requests completed, %llu errors, %llu batches",
		(unsigned long long)s.completed, (unsigned long long)s.errors,
		(unsigned long long)s.batches);
out:
	met_http_stop(s.http); /* (it reads the engine: first) */
	s.http = NULL;
	srv_jobs_stop(&s); /* (they publish epochs: before the engine goes) */
	while (s.clients)
		srv_drop_client(&s, s.clients);
	/* The regions' releases are on the worker's queue: it runs them,
	 * then ends; a pin it answered meanwhile frees its client, whose
	 * release then runs here (no other thread is left). */
	srv_worker_stop(&s.w);
	do
		srv_collect(&s);
	while (srv_worker_run_left(&s.w));
	srv_worker_close(&s.w);
	if (s.lfd >= 0 && o->listen_fd < 0) {
		close(s.lfd);
		unlink(o->socket_path);
	}
	if (s.epfd >= 0)
		close(s.epfd);
	if (s.sfd >= 0)
		close(s.sfd);
	if (s.tfd >= 0)
		close(s.tfd);
	if (s.status_fd >= 0)
		close(s.status_fd);
	if (s.metrics_fd >= 0)
		close(s.metrics_fd);
	for (int i = 0; i < 2; i++) {
		free(s.batch[i].reqs);
		free(s.batch[i].segs);
		free(s.batch[i].hit_off);
		free(s.batch[i].hits);
	}
	srv_trace_free(&s);
	free(s.is_moe);
	free(s.order);
	met_free(&s.met);
	return code;
}
