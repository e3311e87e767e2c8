#include "daemon/server/auth.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int moe_auth_peer(int fd, struct moe_peer *p)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	memset(p, 0, sizeof(*p));
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return -errno;
	p->pid = cred.pid;
	p->uid = cred.uid;
	p->gid = cred.gid;
	len = sizeof(p->groups);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, p->groups, &len) == 0) {
		p->n_groups = len / sizeof(gid_t);
	} else if (errno == ERANGE) {
		/* more groups than we keep: len now says how many; fetch them
		 * all and keep the first MOE_AUTH_MAX_GROUPS */
		gid_t *all = malloc(len ? len : sizeof(gid_t));

		if (all && getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, all, &len) == 0) {
			p->n_groups = len / sizeof(gid_t) < MOE_AUTH_MAX_GROUPS
					      ? len / sizeof(gid_t)
					      : MOE_AUTH_MAX_GROUPS;
			memcpy(p->groups, all, p->n_groups * sizeof(gid_t));
		}
		free(all);
	}
	return 0;
}

static bool member(const struct moe_peer *p, gid_t g)
{
	if (p->gid == g)
		return true;
	for (uint32_t i = 0; i < p->n_groups && i < MOE_AUTH_MAX_GROUPS; i++)
		if (p->groups[i] == g)
			return true;
	return false;
}

bool moe_auth_allowed(const struct moe_auth_policy *pol, const struct moe_peer *p,
		      enum moe_auth_op op)
{
	if (p->uid == 0)
		return true;
	if (op == MOE_AUTH_ADMIN)
		return pol->has_admin_gid && member(p, pol->admin_gid);
	return p->uid == pol->daemon_uid || (pol->has_socket_gid && member(p, pol->socket_gid));
}
