/* tests/test_auth.c — who may do what (daemon/server/auth.h).
 *
 * moe_auth_allowed on crafted credentials (no process needs to hold them),
 * and moe_auth_peer on a real socketpair: the kernel's view of ourselves.
 */
#include <errno.h>
#include <grp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include "tests/testutil.h"

#include "daemon/server/auth.h"

#define DAEMON_UID 990
#define SOCK_GID   991
#define ADMIN_GID  992
#define USER_UID   1000
#define USER_GID   1000
#define OTHER_GID  1234

static struct moe_peer peer(uid_t uid, gid_t gid, uint32_t n, const gid_t *groups)
{
	struct moe_peer p;

	memset(&p, 0, sizeof(p));
	p.pid = 4242;
	p.uid = uid;
	p.gid = gid;
	p.n_groups = n;
	for (uint32_t i = 0; i < n && i < MOE_AUTH_MAX_GROUPS; i++)
		p.groups[i] = groups[i];
	return p;
}

static const struct moe_auth_policy full = {.daemon_uid = DAEMON_UID,
					    .has_socket_gid = true,
					    .has_admin_gid = true,
					    .socket_gid = SOCK_GID,
					    .admin_gid = ADMIN_GID};

static bool fwd(const struct moe_auth_policy *pol, struct moe_peer p)
{
	return moe_auth_allowed(pol, &p, MOE_AUTH_FORWARD);
}

static bool adm(const struct moe_auth_policy *pol, struct moe_peer p)
{
	return moe_auth_allowed(pol, &p, MOE_AUTH_ADMIN);
}

static void test_root(void **state)
{
	struct moe_auth_policy none = {.daemon_uid = DAEMON_UID};
	gid_t g[2] = {OTHER_GID, 5};

	(void)state;
	/* root: always, whatever its groups, whatever the policy */
	assert_true(fwd(&full, peer(0, 0, 0, NULL)));
	assert_true(adm(&full, peer(0, 0, 0, NULL)));
	assert_true(fwd(&full, peer(0, OTHER_GID, 2, g)));
	assert_true(adm(&full, peer(0, OTHER_GID, 2, g)));
	assert_true(fwd(&none, peer(0, 0, 0, NULL)));
	assert_true(adm(&none, peer(0, 0, 0, NULL)));
	/* a daemon running as root: uid 0 is both */
	none.daemon_uid = 0;
	assert_true(fwd(&none, peer(0, 12, 0, NULL)));
	assert_false(fwd(&none, peer(USER_UID, USER_GID, 0, NULL)));
}

static void test_forward(void **state)
{
	gid_t sup_sock[3] = {OTHER_GID, SOCK_GID, 7}, sup_other[2] = {OTHER_GID, 7};
	struct moe_auth_policy nogroup = full;

	(void)state;
	/* the daemon's own user */
	assert_true(fwd(&full, peer(DAEMON_UID, OTHER_GID, 0, NULL)));
	/* the socket's group: primary, supplementary */
	assert_true(fwd(&full, peer(USER_UID, SOCK_GID, 0, NULL)));
	assert_true(fwd(&full, peer(USER_UID, USER_GID, 3, sup_sock)));
	/* outsiders */
	assert_false(fwd(&full, peer(USER_UID, USER_GID, 0, NULL)));
	assert_false(fwd(&full, peer(USER_UID, USER_GID, 2, sup_other)));
	assert_false(fwd(&full, peer(65534, 65534, 0, NULL)));
	/* the admin group alone does not grant forward */
	assert_false(fwd(&full, peer(USER_UID, ADMIN_GID, 0, NULL)));
	/* a uid that equals the socket gid's number is not a member */
	assert_false(fwd(&full, peer(SOCK_GID, USER_GID, 0, NULL)));
	/* unknown credentials (as accept_clients marks them) grant nothing */
	assert_false(fwd(&full, peer((uid_t)-1, (gid_t)-1, 0, NULL)));
	/* no socket group known: only root and the daemon's user */
	nogroup.has_socket_gid = false;
	assert_false(fwd(&nogroup, peer(USER_UID, SOCK_GID, 0, NULL)));
	assert_false(fwd(&nogroup, peer(USER_UID, USER_GID, 3, sup_sock)));
	assert_true(fwd(&nogroup, peer(DAEMON_UID, USER_GID, 0, NULL)));
	assert_true(fwd(&nogroup, peer(0, 0, 0, NULL)));
	/* socket gid 0 (root's group) is a real group */
	nogroup.has_socket_gid = true;
	nogroup.socket_gid = 0;
	assert_true(fwd(&nogroup, peer(USER_UID, 0, 0, NULL)));
	assert_false(fwd(&nogroup, peer(USER_UID, USER_GID, 0, NULL)));
}

static void test_admin(void **state)
{
	gid_t sup_admin[2] = {SOCK_GID, ADMIN_GID}, sup_sock[1] = {SOCK_GID};
	struct moe_auth_policy noadmin = full;

	(void)state;
	/* members of the admin group */
	assert_true(adm(&full, peer(USER_UID, ADMIN_GID, 0, NULL)));
	assert_true(adm(&full, peer(USER_UID, USER_GID, 2, sup_admin)));
	/* not the daemon's own user unless in the group */
	assert_false(adm(&full, peer(DAEMON_UID, DAEMON_UID, 0, NULL)));
	assert_false(adm(&full, peer(DAEMON_UID, SOCK_GID, 1, sup_sock)));
	assert_true(adm(&full, peer(DAEMON_UID, DAEMON_UID, 2, sup_admin)));
	/* socket-group members and outsiders */
	assert_false(adm(&full, peer(USER_UID, SOCK_GID, 0, NULL)));
	assert_false(adm(&full, peer(USER_UID, USER_GID, 1, sup_sock)));
	assert_false(adm(&full, peer(65534, 65534, 0, NULL)));
	assert_false(adm(&full, peer((uid_t)-1, (gid_t)-1, 0, NULL)));
	/* no admin group: root only (admin_gid's value is then meaningless) */
	noadmin.has_admin_gid = false;
	assert_false(adm(&noadmin, peer(USER_UID, ADMIN_GID, 0, NULL)));
	assert_false(adm(&noadmin, peer(USER_UID, USER_GID, 2, sup_admin)));
	assert_false(adm(&noadmin, peer(DAEMON_UID, DAEMON_UID, 0, NULL)));
	noadmin.admin_gid = 0; /* a zeroed policy must not make gid 0 admins */
	assert_false(adm(&noadmin, peer(USER_UID, 0, 0, NULL)));
	assert_true(adm(&noadmin, peer(0, 0, 0, NULL)));
	/* admin group gid 0 configured explicitly: members of root's group */
	noadmin.has_admin_gid = true;
	assert_true(adm(&noadmin, peer(USER_UID, 0, 0, NULL)));
	/* admin rights do not depend on forward rights */
	assert_true(adm(&full, peer(USER_UID, OTHER_GID, 1, (gid_t[]){ADMIN_GID})));
	assert_false(fwd(&full, peer(USER_UID, OTHER_GID, 1, (gid_t[]){ADMIN_GID})));
}

static void test_max_groups(void **state)
{
	gid_t *g = calloc(MOE_AUTH_MAX_GROUPS + 8, sizeof(gid_t));
	struct moe_peer p;

	(void)state;
	assert_non_null(g);
	for (int i = 0; i < MOE_AUTH_MAX_GROUPS; i++)
		g[i] = 5000 + (gid_t)i;
	/* the socket group as the last of MOE_AUTH_MAX_GROUPS: seen */
	g[MOE_AUTH_MAX_GROUPS - 1] = SOCK_GID;
	p = peer(USER_UID, USER_GID, MOE_AUTH_MAX_GROUPS, g);
	assert_true(moe_auth_allowed(&full, &p, MOE_AUTH_FORWARD));
	assert_false(moe_auth_allowed(&full, &p, MOE_AUTH_ADMIN));
	g[0] = ADMIN_GID;
	p = peer(USER_UID, USER_GID, MOE_AUTH_MAX_GROUPS, g);
	assert_true(moe_auth_allowed(&full, &p, MOE_AUTH_ADMIN));
	/* an n_groups that claims more than the array holds must not read
	 * past it (ASan would see it): only the array counts */
	for (int i = 0; i < MOE_AUTH_MAX_GROUPS; i++)
		g[i] = 5000 + (gid_t)i;
	p = peer(USER_UID, USER_GID, MOE_AUTH_MAX_GROUPS, g);
	p.n_groups = 0xffffffffu;
	assert_false(moe_auth_allowed(&full, &p, MOE_AUTH_FORWARD));
	assert_false(moe_auth_allowed(&full, &p, MOE_AUTH_ADMIN));
	p.groups[MOE_AUTH_MAX_GROUPS - 1] = SOCK_GID;
	assert_true(moe_auth_allowed(&full, &p, MOE_AUTH_FORWARD));
	/* groups past n_groups do not count */
	p = peer(USER_UID, USER_GID, 3, g);
	p.groups[3] = SOCK_GID;
	p.groups[MOE_AUTH_MAX_GROUPS - 1] = ADMIN_GID;
	assert_false(moe_auth_allowed(&full, &p, MOE_AUTH_FORWARD));
	assert_false(moe_auth_allowed(&full, &p, MOE_AUTH_ADMIN));
	p.n_groups = 4;
	assert_true(moe_auth_allowed(&full, &p, MOE_AUTH_FORWARD));
	free(g);
}

static int cmp_gid(const void *a, const void *b)
{
	gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;

	return x < y ? -1 : x > y;
}

/* The kernel's view of the other end of a socketpair: ourselves. */
static void check_self(int fd, const gid_t *want, int n_want)
{
	struct moe_peer *p = malloc(sizeof(*p));
	gid_t *got;

	assert_non_null(p);
	memset(p, 0xa5, sizeof(*p));
	assert_int_equal(moe_auth_peer(fd, p), 0);
	assert_int_equal(p->pid, getpid());
	assert_int_equal(p->uid, geteuid());
	assert_int_equal(p->gid, getegid());
	if (n_want > MOE_AUTH_MAX_GROUPS) {
		/* more than we can see: auth.h promises that groups past
		 * MOE_AUTH_MAX_GROUPS grant nothing; today none is seen
		 * (ERANGE), at most the first MOE_AUTH_MAX_GROUPS would be */
		printf("  %d groups: moe_auth_peer sees %u of them\n", n_want, p->n_groups);
		assert_true(p->n_groups == 0 || p->n_groups == MOE_AUTH_MAX_GROUPS);
		for (uint32_t i = 0; i < p->n_groups; i++)
			assert_non_null(bsearch(&p->groups[i], want, (size_t)n_want, sizeof(gid_t),
						cmp_gid));
		free(p);
		return;
	}
	assert_int_equal(p->n_groups, (uint32_t)n_want);
	got = malloc(sizeof(gid_t) * (size_t)(n_want ? n_want : 1));
	assert_non_null(got);
	memcpy(got, p->groups, sizeof(gid_t) * (size_t)n_want);
	qsort(got, (size_t)n_want, sizeof(gid_t), cmp_gid);
	for (int i = 0; i < n_want; i++)
		assert_int_equal(got[i], want[i]);
	free(got);
	free(p);
}

static void check_pair(int type, const char *what)
{
	int sv[2], n = getgroups(0, NULL);
	gid_t *g;

	assert_true(n >= 0);
	g = calloc((size_t)n + 1, sizeof(gid_t));
	assert_non_null(g);
	assert_int_equal(getgroups(n, g), n);
	qsort(g, (size_t)n, sizeof(gid_t), cmp_gid);
	assert_int_equal(socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv), 0);
	printf("%s: uid %d gid %d, %d supplementary groups\n", what, (int)geteuid(),
	       (int)getegid(), n);
	check_self(sv[0], g, n);
	check_self(sv[1], g, n);
	close(sv[0]);
	close(sv[1]);
	free(g);
}

static void test_peer(void **state)
{
	struct moe_peer p;

	(void)state;
	check_pair(SOCK_SEQPACKET, "seqpacket pair");
	check_pair(SOCK_STREAM, "stream pair");
	/* not a socket */
	{
		int pfd[2];

		assert_int_equal(pipe(pfd), 0);
		assert_true(moe_auth_peer(pfd[0], &p) < 0);
		close(pfd[0]);
		close(pfd[1]);
	}
	assert_int_equal(moe_auth_peer(-1, &p), -EBADF);
}

/* As root: other supplementary groups, seen through a fresh socketpair
 * (SO_PEERGROUPS reports the groups at connect/socketpair time). */
static void test_peer_groups(void **state)
{
	gid_t *saved, *g;
	int n_saved, sizes[] = {0, 1, 5, MOE_AUTH_MAX_GROUPS, MOE_AUTH_MAX_GROUPS + 1, 300};

	(void)state;
	if (geteuid() != 0) {
		printf("test_peer_groups: SKIPPED (needs root to change its groups)\n");
		skip();
	}
	n_saved = getgroups(0, NULL);
	assert_true(n_saved >= 0);
	saved = calloc((size_t)n_saved + 1, sizeof(gid_t));
	g = calloc(400, sizeof(gid_t));
	assert_non_null(saved);
	assert_non_null(g);
	assert_int_equal(getgroups(n_saved, saved), n_saved);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		int n = sizes[k];
		char what[64];

		for (int i = 0; i < n; i++)
			g[i] = 20000 + (gid_t)i * 3;
		if (setgroups((size_t)n, g)) {
			printf("setgroups(%d): %s; size skipped\n", n, strerror(errno));
			continue;
		}
		snprintf(what, sizeof(what), "%d groups", n);
		check_pair(SOCK_SEQPACKET, what);
	}
	assert_int_equal(setgroups((size_t)n_saved, saved), 0);
	free(saved);
	free(g);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_root),	    cmocka_unit_test(test_forward),
		cmocka_unit_test(test_admin),	    cmocka_unit_test(test_max_groups),
		cmocka_unit_test(test_peer),	    cmocka_unit_test(test_peer_groups),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
