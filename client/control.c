/* client/control.c — control messages: sending one, ping, status, admin (see internal.h). */
#include "client/internal.h"

/* Sends a control message; 0, or MOE_EDAEMON (the connection is then dead). */
int mc_send_ctl(struct moe_client *c, uint16_t type, const void *p, uint32_t len, uint32_t *seq)
{
	union {
		unsigned char b[MOE_MSG_MAX];
		struct moe_msg_hdr align;
	} buf;
	size_t n;
	int r;

	if (c->dead)
		return MOE_EDAEMON;
	c->seq++;
	if (seq)
		*seq = c->seq;
	n = moe_msg_encode(buf.b, type, c->seq, p, len);
	r = mc_send_dgram(c->sock, buf.b, n, -1, type == MOE_MSG_DOORBELL ? 0 : SEND_MS);
	if (r == -ETIMEDOUT)
		return MOE_EBUSY; /* the daemon does not read: a stuck, not a dead one */
	if (r < 0) {
		mc_mark_dead(c);
		return MOE_EDAEMON;
	}
	return 0;
}

MOE_API int moe_ping(moe_client *c, uint64_t *round_trip_ns)
{
	struct moe_sqe e = {.flags = MOE_SQE_NOP};
	uint64_t deadline = deadline_after(CONTROL_MS), t0, tag;
	int r, status = 0;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	r = mc_enter(c);
	if (!r)
		r = mc_wait_room(c, 0, deadline);
	if (r)
		goto out_unlock;
	t0 = now_ns();
	mc_push(c, &e, &tag);
	r = mc_wait_tag(c, tag, deadline, &status, NULL);
	if (r == MOE_ETIMEDOUT) {
		struct slot *s = mc_find_slot(c, tag);

		if (s)
			s->orphan = 1; /* nobody will collect it */
		goto out_unlock;
	}
	if (!r)
		r = status;
	if (!r && round_trip_ns)
		*round_trip_ns = now_ns() - t0;
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}

/* Reads the JSON from the memfd of a STATUS_REPLY. */
static int read_status_fd(int fd, uint64_t json_bytes, char **json, size_t *len)
{
	struct stat st;
	char *p;
	uint64_t got = 0;

	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || json_bytes > (uint64_t)st.st_size ||
	    json_bytes > MAX_STATUS_JSON)
		return MOE_EPROTO;
	p = malloc(json_bytes + 1);
	if (!p)
		return MOE_ENOMEM;
	while (got < json_bytes) {
		ssize_t n = pread(fd, p + got, json_bytes - got, (off_t)got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			free(p);
			return MOE_EPROTO;
		}
		got += (uint64_t)n;
	}
	p[json_bytes] = '\0';
	*json = p;
	if (len)
		*len = json_bytes;
	return 0;
}

/* One control round trip (STATUS, ADMIN): waits for its turn (one request
 * of a kind at a time), sends, and waits for the reply that mc_drain() files
 * under *have. Called and returns with c->mu held. *owned tells whether
 * this call took the slot (then the caller reads the reply, clears *busy
 * and *have and wakes the others), whatever the result. */
static int ctl_roundtrip(struct moe_client *c, int *busy, int *have, uint32_t *seq,
			 uint16_t type, const void *p, uint32_t len, uint64_t deadline,
			 int *owned)
{
	int r = mc_enter(c);

	*owned = 0;
	while (!r && *busy) {
		if (now_ns() >= deadline)
			r = MOE_ETIMEDOUT;
		else
			mc_wait_step(c, deadline);
		if (c->dead)
			r = MOE_EDAEMON;
	}
	if (r)
		return r;
	*busy = 1;
	*have = 0;
	*owned = 1;
	r = mc_send_ctl(c, type, p, len, seq);
	while (!r && !*have) {
		mc_drain(c);
		if (*have)
			break;
		if (c->dead)
			r = MOE_EDAEMON;
		else if (now_ns() >= deadline)
			r = MOE_ETIMEDOUT;
		else
			mc_wait_step(c, deadline);
	}
	return r;
}

MOE_API int moe_status_json(moe_client *c, char **json, size_t *len)
{
	uint64_t deadline = deadline_after(CONTROL_MS);
	int r, owned;

	if (!c || !json)
		return MOE_EINVAL;
	*json = NULL;
	pthread_mutex_lock(&c->mu);
	r = ctl_roundtrip(c, &c->status_busy, &c->status_have, &c->status_seq, MOE_MSG_STATUS,
			  NULL, 0, deadline, &owned);
	if (!owned)
		goto out_unlock;
	if (!r) {
		if (c->status_msg.status)
			r = wire_status(c->status_msg.status);
		else if (c->status_fd < 0)
			r = MOE_EPROTO;
		else
			r = read_status_fd(c->status_fd, c->status_msg.json_bytes, json, len);
	}
	if (c->status_fd >= 0) {
		close(c->status_fd);
		c->status_fd = -1;
	}
	c->status_busy = 0;
	c->status_have = 0;
	mc_wake_all(c);
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_admin(moe_client *c, uint32_t op, uint32_t flags, int timeout_ms, char *msg,
		      size_t msglen)
{
	uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : deadline_after((uint32_t)timeout_ms);
	struct moe_msg_admin a = {op, flags};
	int r, owned;

	if (!c)
		return MOE_EINVAL;
	if (msg && msglen)
		msg[0] = '\0';
	pthread_mutex_lock(&c->mu);
	r = ctl_roundtrip(c, &c->admin_busy, &c->admin_have, &c->admin_seq, MOE_MSG_ADMIN, &a,
			  sizeof(a), deadline, &owned);
	if (!owned)
		goto out_unlock;
	if (!r) {
		if (msg && msglen)
			snprintf(msg, msglen, "%s", c->admin_msg.message);
		r = c->admin_msg.status ? wire_status(c->admin_msg.status) : 0;
	}
	c->admin_busy = 0;
	c->admin_have = 0;
	mc_wake_all(c);
out_unlock:
	pthread_mutex_unlock(&c->mu);
	return r;
}
