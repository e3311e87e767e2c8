/* daemon/server/admin.c — operator commands: drain, undrain, configuration reload
 * (see internal.h). */
#include "daemon/server/internal.h"

void srv_admin_reply(struct client *c, uint32_t seq, int status, const char *msg)
{
	struct moe_msg_admin_reply r = {.status = status};

	snprintf(r.message, sizeof(r.message), "%s", msg);
	srv_send_msg_seq(c->fd, MOE_MSG_ADMIN_REPLY, seq, &r, sizeof(r), -1);
}

void srv_status_line(struct server *s)
{
	srv_notify("STATUS=%s %s on %s (%s kernels): %llu requests served, %u clients",
	       s->draining ? "draining" : "serving", moe_family_name(s->m->family),
	       moe_engine_backend(s->e), moe_engine_kernels(s->e),
	       (unsigned long long)s->completed, s->n_clients);
}

/* Re-reads the configuration through the caller's hook; serving goes on
 * whatever the outcome. */
int srv_reload_config(struct server *s, char *msg, size_t n)
{
	struct timespec t;
	int ret;

	if (!s->o.reload) {
		snprintf(msg, n, "no configuration file to reload (started without -c)");
		return -ENOENT;
	}
	clock_gettime(CLOCK_MONOTONIC, &t);
	srv_notify("RELOADING=1\nMONOTONIC_USEC=%llu",
	       (unsigned long long)t.tv_sec * 1000000ull + (unsigned long long)t.tv_nsec / 1000);
	ret = s->o.reload(s->o.reload_arg, &s->o, msg, n);
	if (ret) {
		s->reloads_refused++;
		moe_log(LOG_ERR, "configuration reload refused, serving on: %s", msg);
		srv_notify("READY=1\nSTATUS=configuration reload refused: %.400s", msg);
		return ret;
	}
	s->reloads++;
	moe_log_set_level(s->o.log_level);
	moe_log(LOG_NOTICE, "configuration reloaded: %s", msg);
	srv_notify("READY=1");
	srv_status_line(s);
	return 0;
}

void srv_admin(struct server *s, struct client *c, const struct moe_msg_admin *a, uint32_t seq)
{
	char msg[240];

	if (!moe_auth_allowed(&s->o.auth, &c->peer, MOE_AUTH_ADMIN)) {
		s->refused_auth++;
		srv_log_refusal(s, c->peer.uid, "client %u (pid %d, uid %d): admin command %u refused: "
			    "not root or in the admin group%s%s", c->id, (int)c->pid, (int)c->uid,
			    a->op, s->o.admin_group && *s->o.admin_group ? " " : "",
			    s->o.admin_group ? s->o.admin_group : "");
		srv_admin_reply(c, seq, MOE_EPERM, "not allowed: root or server.admin_group only");
		return;
	}
	switch (a->op) {
	case MOE_ADMIN_DRAIN:
		/* what clients submitted before the drain is queued, not refused */
		for (struct client *x = s->clients; x; x = x->next)
			srv_poll_sq(s, x);
		if (!s->draining)
			moe_log(LOG_NOTICE, "draining: new requests are refused, %u queued finish",
				s->pending);
		s->draining = true;
		srv_status_line(s);
		if ((a->flags & MOE_ADMIN_WAIT) && s->pending) {
			c->drain_waiter = true;
			c->drain_seq = seq;
			return;
		}
		snprintf(msg, sizeof(msg), "draining; %u requests queued", s->pending);
		srv_admin_reply(c, seq, 0, msg);
		return;
	case MOE_ADMIN_UNDRAIN:
		if (s->draining)
			moe_log(LOG_NOTICE, "undrained: accepting requests again");
		s->draining = false;
		srv_status_line(s);
		srv_admin_reply(c, seq, 0, "accepting requests");
		return;
	case MOE_ADMIN_RELOAD_CONFIG: {
		int ret = srv_reload_config(s, msg, sizeof(msg));

		srv_admin_reply(c, seq, ret ? MOE_EINVAL : 0, msg);
		return;
	}
	}
}

/* Clients waiting for a drain to complete get their answer once idle. */
void srv_answer_drain_waiters(struct server *s)
{
	if (s->pending)
		return;
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->drain_waiter) {
			srv_admin_reply(c, c->drain_seq, 0, "drained: nothing queued");
			c->drain_waiter = false;
		}
	}
}
