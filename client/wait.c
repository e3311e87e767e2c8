/* client/wait.c — waiting: draining the socket, the poller and its followers, waiting for
 * a tag or for room (see internal.h).
 *
 * Waiting (leader/followers): of the threads that wait for something, one
 * at a time — the poller — sleeps in poll() on the socket and an eventfd
 * without the mutex; the others sleep on a condition variable. Whoever
 * reaps completions (the poller after waking, or moe_poll) broadcasts the
 * condition variable, and kicks the eventfd if a poller sleeps, so no
 * wakeup is lost when one thread drains a doorbell meant for another.
 */
#include "client/internal.h"

/* Reads every datagram waiting on the socket. */
void mc_drain(struct moe_client *c)
{
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;

	while (!c->dead && c->sock >= 0) {
		int fds[4], n_fds;
		ssize_t n = mc_recv_msg(c->sock, buf.b, sizeof(buf.b), fds, &n_fds);
		struct moe_msg_hdr h;
		int type;

		if (n == -EAGAIN || n == -EWOULDBLOCK)
			return;
		if (n <= 0) {
			mc_mark_dead(c);
			return;
		}
		type = moe_msg_peek(buf.b, (size_t)n, &h);
		if (type == MOE_MSG_TRACE) {
			close_fds(fds, n_fds);
			if (mc_file_trace(c, type, buf.b, (size_t)n))
				mc_wake_all(c);
			continue;
		}
		if (mc_file_reply(c, type, &h, buf.b, (size_t)n, fds, n_fds)) {
			mc_wake_all(c);
			continue;
		}
		close_fds(fds, n_fds);
		if (type == MOE_MSG_ERROR) {
			mc_mark_dead(c); /* the daemon hangs up after an ERROR */
			return;
		}
		/* DOORBELL, or something we do not expect: look at the rings. */
	}
}

/* One wait: as the poller in poll() on the socket, or on the condition
 * variable, until something may have changed or `deadline`. The caller
 * loops, checking what it waits for, c->dead and the deadline. */
void mc_wait_step(struct moe_client *c, uint64_t deadline)
{
	struct pollfd p[2];
	int sock = c->sock, timeout, r;

	if (c->polling) {
		if (deadline == NO_DEADLINE) {
			pthread_cond_wait(&c->cv, &c->mu);
		} else {
			struct timespec ts = {(time_t)(deadline / 1000000000u),
			                      (long)(deadline % 1000000000u)};

			pthread_cond_timedwait(&c->cv, &c->mu, &ts);
		}
		return;
	}
	c->polling = 1;
	atomic_store(&c->hdr->client_waiting, 1);
	if (mc_reap(c)) { /* posted before the daemon could see client_waiting */
		c->polling = 0;
		atomic_store(&c->hdr->client_waiting, 0);
		return;
	}
	timeout = ms_left(deadline, POLL_CAP_MS);
	p[0] = (struct pollfd){sock, POLLIN, 0};
	p[1] = (struct pollfd){c->evfd, POLLIN, 0};
	pthread_mutex_unlock(&c->mu);
	r = poll(p, 2, timeout);
	pthread_mutex_lock(&c->mu);
	c->polling = 0;
	atomic_store(&c->hdr->client_waiting, 0);
	if (r > 0 && p[1].revents) {
		uint64_t v;

		if (read(c->evfd, &v, sizeof(v)) < 0) {
			/* EAGAIN: another read got it */
		}
	}
	mc_drain(c);
	mc_reap(c);
	if (c->dead && c->sock >= 0) {
		close(c->sock);
		c->sock = -1;
	}
	pthread_cond_broadcast(&c->cv); /* let another waiter become the poller */
}

/* Waits until the slot for `tag` is done (0), or MOE_ETIMEDOUT / MOE_ENOENT. */
int mc_wait_tag(struct moe_client *c, uint64_t tag, uint64_t deadline, int *status, uint32_t *epoch)
{
	struct slot *s = mc_find_slot(c, tag);

	if (!s || s->orphan)
		return MOE_ENOENT;
	s->waiters++;
	for (;;) {
		s = mc_find_slot(c, tag);
		if (!s)
			return MOE_ENOENT; /* another waiter of the same tag took it */
		if (s->state == SLOT_DONE) {
			if (status)
				*status = s->status;
			if (epoch)
				*epoch = s->epoch;
			mc_put_slot(c, s);
			mc_wake_all(c); /* a slot is free: blocked submitters may go on */
			return 0;
		}
		if (now_ns() >= deadline) {
			s->waiters--;
			return MOE_ETIMEDOUT;
		}
		mc_wait_step(c, deadline);
	}
}

/* Waits until one request of n tokens may be pushed (c->mu held). */
int mc_wait_room(struct moe_client *c, uint32_t n_tokens, uint64_t deadline)
{
	for (;;) {
		mc_drain(c);
		mc_reap(c);
		if (c->dead)
			return MOE_EDAEMON;
		if (mc_has_room(c, n_tokens))
			return 0;
		if (now_ns() >= deadline)
			return MOE_ETIMEDOUT;
		mc_wait_step(c, deadline);
	}
}
