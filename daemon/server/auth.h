/* daemon/server/auth.h — who may do what.
 *
 * The peer's credentials come from the kernel (SO_PEERCRED for uid/gid/pid,
 * SO_PEERGROUPS for the supplementary groups), never from the client.
 * Forward requests: root, the daemon's own user, or a member (primary or
 * supplementary) of the socket's group (administrators may connect too).
 * Administration (drain, undrain,
 * config reload; later weight reload, rebalance, replicate): root, or a
 * member of server.admin_group when one is configured.
 */
#ifndef MOE_AUTH_H
#define MOE_AUTH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define MOE_AUTH_MAX_GROUPS 256

struct moe_peer {
	pid_t pid;
	uid_t uid;
	gid_t gid;
	uint32_t n_groups;
	gid_t groups[MOE_AUTH_MAX_GROUPS];
};

struct moe_auth_policy {
	uid_t daemon_uid;
	bool has_socket_gid, has_admin_gid;
	gid_t socket_gid; /* forward: members of this group */
	gid_t admin_gid;  /* admin: members of this group */
};

enum moe_auth_op { MOE_AUTH_FORWARD, MOE_AUTH_ADMIN };

/* Credentials of the process at the other end of a connected Unix socket.
 * 0 or -errno. Groups past MOE_AUTH_MAX_GROUPS are not seen (so they
 * grant nothing). */
int moe_auth_peer(int fd, struct moe_peer *p);

bool moe_auth_allowed(const struct moe_auth_policy *pol, const struct moe_peer *p,
		      enum moe_auth_op op);

#endif
