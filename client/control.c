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

/* ---- the pending-call table ----------------------------------------------- */

bool mc_file_reply(struct moe_client *c, int type, const struct moe_msg_hdr *h, const void *buf,
		   size_t n, int *fds, int n_fds)
{
	for (int i = 0; i < MAX_CALLS; i++) {
		struct call *k = &c->calls[i];

		if (!k->want || k->seq != h->seq)
			continue;
		if (k->want == type && !k->have &&
		    ((type == MOE_MSG_STATUS_REPLY && !moe_msg_decode_status_reply(buf, n, &k->status)) ||
		     (type == MOE_MSG_METRICS_REPLY &&
		      !moe_msg_decode_metrics_reply(buf, n, &k->status)))) {
			k->have = 1;
			k->fd = n_fds ? fds[0] : -1;
			close_fds(fds + 1, n_fds ? n_fds - 1 : 0);
			return true;
		}
		if (type == MOE_MSG_ADMIN_REPLY && k->want == type && !k->have &&
		    !moe_msg_decode_admin_reply(buf, n, &k->admin, k->data, sizeof(k->data),
						&k->data_len)) {
			k->have = 1;
			/* no job started: nothing more will come */
			if (k->admin.status || k->data_len != sizeof(struct moe_admin_job))
				k->want_job = 0;
			close_fds(fds, n_fds);
			return true;
		}
		if (type == MOE_MSG_JOB_DONE && k->want_job && k->have && !k->have_job &&
		    !moe_msg_decode_job_done(buf, n, &k->job)) {
			k->have_job = 1;
			close_fds(fds, n_fds);
			return true;
		}
	}
	return false; /* a reply for a call that gave up, or unexpected: dropped */
}

void mc_calls_fail(struct moe_client *c)
{
	for (int i = 0; i < MAX_CALLS; i++) {
		if (c->calls[i].fd >= 0)
			close(c->calls[i].fd);
		c->calls[i].fd = -1;
	}
}

static void call_free(struct moe_client *c, struct call *k)
{
	if (k->fd >= 0)
		close(k->fd);
	k->fd = -1;
	k->want = 0;
	mc_wake_all(c); /* a caller may wait for a free entry */
}

/* One control call: takes a free entry (waiting for one if every entry is
 * in use), sends, and waits for the reply (and the job's end if
 * `want_job`) that mc_drain() files under it. Called and returns with c->mu
 * held; on success *out is the entry, which the caller reads and frees
 * with call_free(). */
static int call(struct moe_client *c, uint16_t type, const void *p, uint32_t len,
		uint16_t reply, bool want_job, uint64_t deadline, struct call **out)
{
	struct call *k = NULL;
	int r = mc_enter(c);

	while (!r && !k) {
		for (int i = 0; i < MAX_CALLS && !k; i++)
			if (!c->calls[i].want)
				k = &c->calls[i];
		if (k)
			break;
		if (now_ns() >= deadline)
			r = MOE_ETIMEDOUT;
		else
			mc_wait_step(c, deadline);
		if (c->dead)
			r = MOE_EDAEMON;
	}
	if (r)
		return r;
	*k = (struct call){.want = reply, .want_job = want_job, .fd = -1};
	r = mc_send_ctl(c, type, p, len, &k->seq); /* (the mutex is held: no reply yet) */
	while (!r && !(k->have && (!k->want_job || k->have_job))) {
		mc_drain(c);
		if (k->have && (!k->want_job || k->have_job))
			break;
		if (c->dead)
			r = MOE_EDAEMON;
		else if (now_ns() >= deadline)
			r = MOE_ETIMEDOUT;
		else
			mc_wait_step(c, deadline);
	}
	if (r) {
		call_free(c, k); /* a late reply finds no call and is dropped */
		return r;
	}
	*out = k;
	return 0;
}

/* STATUS or METRICS: a text in a sealed memfd. */
static int text_call(moe_client *c, uint16_t ask, uint16_t want, char **json, size_t *len)
{
	uint64_t deadline = deadline_after(CONTROL_MS);
	struct call *k;
	int r;

	if (!c || !json)
		return MOE_EINVAL;
	*json = NULL;
	pthread_mutex_lock(&c->mu);
	r = call(c, ask, NULL, 0, want, false, deadline, &k);
	if (!r) {
		if (k->status.status)
			r = wire_status(k->status.status);
		else if (k->fd < 0)
			r = MOE_EPROTO;
		else
			r = read_status_fd(k->fd, k->status.json_bytes, json, len);
		call_free(c, k);
	}
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_status_json(moe_client *c, char **json, size_t *len)
{
	return text_call(c, MOE_MSG_STATUS, MOE_MSG_STATUS_REPLY, json, len);
}

MOE_API int moe_metrics_text(moe_client *c, char **text, size_t *len)
{
	return text_call(c, MOE_MSG_METRICS, MOE_MSG_METRICS_REPLY, text, len);
}

MOE_API int moe_admin_call(moe_client *c, const moe_admin_req *req, moe_admin_res *res)
{
	struct {
		struct moe_msg_admin a;
		unsigned char p[MOE_ADMIN_DATA_MAX];
	} m;
	uint64_t deadline;
	struct call *k;
	int r;

	if (!c || !req || !res || req->payload_len > sizeof(m.p) ||
	    (req->payload_len && !req->payload))
		return MOE_EINVAL;
	memset(res, 0, sizeof(*res));
	deadline = req->timeout_ms < 0 ? NO_DEADLINE : deadline_after(req->timeout_ms);
	m.a = (struct moe_msg_admin){req->op, req->flags};
	if (req->payload_len)
		memcpy(m.p, req->payload, req->payload_len);
	pthread_mutex_lock(&c->mu);
	r = call(c, MOE_MSG_ADMIN, &m, (uint32_t)(sizeof(m.a) + req->payload_len),
		 MOE_MSG_ADMIN_REPLY, req->wait_job != 0, deadline, &k);
	if (!r) {
		res->status = k->admin.status ? wire_status(k->admin.status) : 0;
		snprintf(res->message, sizeof(res->message), "%s", k->admin.message);
		res->result_len = k->data_len;
		memcpy(res->result, k->data, k->data_len);
		if (k->data_len == sizeof(struct moe_admin_job) && !k->admin.status)
			memcpy(&res->job, k->data, sizeof(res->job));
		if (k->have_job)
			res->job = k->job;
		call_free(c, k);
		r = res->status;
	}
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_admin(moe_client *c, uint32_t op, uint32_t flags, int timeout_ms, char *msg,
		      size_t msglen)
{
	moe_admin_req q = {.op = op, .flags = flags, .timeout_ms = timeout_ms};
	moe_admin_res *res = malloc(sizeof(*res));
	int r;

	if (msg && msglen)
		msg[0] = '\0';
	if (!res)
		return MOE_ENOMEM;
	r = moe_admin_call(c, &q, res);
	if (msg && msglen)
		snprintf(msg, msglen, "%s", res->message);
	free(res);
	return r;
}

MOE_API int moe_epoch_info(moe_client *c, uint32_t id, struct moe_admin_epoch_info *info,
			   uint32_t *versions, uint32_t cap)
{
	struct moe_admin_epoch e = {id, 0};
	moe_admin_req q = {.op = MOE_ADMIN_EPOCH_INFO, .payload = &e, .payload_len = sizeof(e),
			   .timeout_ms = CONTROL_MS};
	moe_admin_res *res = malloc(sizeof(*res));
	int r;

	if (!info || !res) {
		free(res);
		return !info ? MOE_EINVAL : MOE_ENOMEM;
	}
	r = moe_admin_call(c, &q, res);
	if (!r && res->result_len < sizeof(*info))
		r = MOE_EPROTO;
	if (!r) {
		memcpy(info, res->result, sizeof(*info));
		if (res->result_len != sizeof(*info) + (size_t)info->n_layers * sizeof(uint32_t))
			r = MOE_EPROTO;
		else if (versions)
			memcpy(versions, res->result + sizeof(*info),
			       (size_t)(cap < info->n_layers ? cap : info->n_layers) *
				       sizeof(uint32_t));
	}
	free(res);
	return r;
}

MOE_API int moe_job(moe_client *c, uint32_t job, int cancel, struct moe_admin_job *out)
{
	struct moe_admin_job_ref j = {job, 0};
	moe_admin_req q = {.op = cancel ? MOE_ADMIN_JOB_CANCEL : MOE_ADMIN_JOB_STATUS,
			   .payload = &j, .payload_len = sizeof(j), .timeout_ms = CONTROL_MS};
	moe_admin_res *res = malloc(sizeof(*res));
	int r;

	if (!res)
		return MOE_ENOMEM;
	r = moe_admin_call(c, &q, res);
	if (!r && res->result_len != sizeof(*out))
		r = MOE_EPROTO;
	if (!r && out)
		memcpy(out, res->result, sizeof(*out));
	free(res);
	return r;
}

_Static_assert(sizeof(((moe_admin_res *)0)->result) == MOE_ADMIN_DATA_MAX,
	       "moe_admin_res.result holds any admin result");

/* ---- tracing ---------------------------------------------------------------- */

bool mc_file_trace(struct moe_client *c, int type, const void *buf, size_t n)
{
	struct trace_q *t = &c->trace;
	struct moe_msg_trace h = {0};
	struct trace_msg *m;
	uint32_t len = 0;

	if (type != MOE_MSG_TRACE || !t->on || !t->q)
		return false; /* (after a stop: the ones already on their way) */
	if (t->n == TRACE_QUEUE) {
		/* dropped, counted; the last one still ends the trace */
		moe_msg_decode_trace(buf, n, &h, NULL, 0, &len);
		t->dropped += h.n_records;
		if (h.flags & MOE_TRACE_MSG_END)
			t->on = 0;
		return false;
	}
	m = &t->q[(t->head + t->n) % TRACE_QUEUE];
	if (moe_msg_decode_trace(buf, n, &h, m->b, sizeof(m->b), &len)) {
		t->dropped += h.n_records; /* (0 if not even the header decoded) */
		if (h.flags & MOE_TRACE_MSG_END)
			t->on = 0;
		return false;
	}
	m->len = len;
	m->n = h.n_records;
	m->flags = h.flags;
	m->lost = h.lost;
	t->n++;
	return true;
}

/* The head message is read: the trace ends with the last one. */
static void trace_pop(struct trace_q *t)
{
	if (t->q[t->head].flags & MOE_TRACE_MSG_END)
		t->on = 0;
	t->head = (t->head + 1) % TRACE_QUEUE;
	t->n--;
	t->off = t->done = 0;
}

static void trace_reset(struct trace_q *t)
{
	t->head = t->n = t->off = t->done = 0;
	t->want = t->got = t->dropped = 0;
	t->on = 0;
}

void mc_trace_reset(struct moe_client *c)
{
	trace_reset(&c->trace);
}

static int trace_call(moe_client *c, const struct moe_admin_trace *p)
{
	moe_admin_req q = {.op = MOE_ADMIN_TRACE, .payload = p, .payload_len = sizeof(*p),
			   .timeout_ms = CONTROL_MS};
	moe_admin_res *res = malloc(sizeof(*res));
	int r;

	if (!res)
		return MOE_ENOMEM;
	r = moe_admin_call(c, &q, res);
	free(res);
	return r;
}

MOE_API int moe_trace_start(moe_client *c, const struct moe_admin_trace *filter)
{
	struct moe_admin_trace p;
	int r;

	if (!c || !filter || (filter->flags & MOE_TRACE_STOP))
		return MOE_EINVAL;
	p = *filter;
	pthread_mutex_lock(&c->mu);
	if (!c->trace.q)
		c->trace.q = malloc(TRACE_QUEUE * sizeof(*c->trace.q));
	r = c->trace.q ? 0 : MOE_ENOMEM;
	if (!r) {
		/* on before the call: records may follow its reply at once */
		trace_reset(&c->trace);
		c->trace.on = 1;
		c->trace.want = p.count;
	}
	pthread_mutex_unlock(&c->mu);
	if (r)
		return r;
	r = trace_call(c, &p);
	if (r) {
		pthread_mutex_lock(&c->mu);
		trace_reset(&c->trace);
		pthread_mutex_unlock(&c->mu);
	}
	return r;
}

MOE_API int moe_trace_next(moe_client *c, moe_trace_event *ev, int timeout_ms)
{
	uint64_t deadline = deadline_after(timeout_ms);
	struct trace_q *t;
	int r = 0;

	if (!c || !ev)
		return MOE_EINVAL;
	t = &c->trace;
	pthread_mutex_lock(&c->mu);
	for (;;) {
		if (t->want && t->got == t->want) {
			r = MOE_ENOENT;
			break;
		}
		if (t->n) {
			struct trace_msg *m = &t->q[t->head];

			if (t->done == m->n) {
				/* (a message that carries no record: none is sent) */
				trace_pop(t);
				continue;
			}
			r = moe_trace_record_at(m->b, m->len, &t->off, &ev->rec, ev->hits);
			if (r) {
				trace_pop(t); /* the rest of a malformed message */
				break;
			}
			ev->lost = m->lost + t->dropped;
			if (++t->done == m->n) {
				if (t->off != m->len) {
					trace_pop(t);
					r = MOE_EPROTO; /* bytes after its last record */
					break;
				}
				trace_pop(t);
			}
			t->got++;
			break;
		}
		if (!t->on) {
			r = MOE_ENOENT;
			break;
		}
		if (c->dead) {
			r = MOE_EDAEMON;
			break;
		}
		if (now_ns() >= deadline) {
			r = MOE_ETIMEDOUT;
			break;
		}
		mc_wait_step(c, deadline);
	}
	pthread_mutex_unlock(&c->mu);
	return r;
}

MOE_API int moe_trace_stop(moe_client *c)
{
	struct moe_admin_trace p = {.flags = MOE_TRACE_STOP};
	int r;

	if (!c)
		return MOE_EINVAL;
	pthread_mutex_lock(&c->mu);
	trace_reset(&c->trace);
	pthread_mutex_unlock(&c->mu);
	r = trace_call(c, &p);
	return r;
}
