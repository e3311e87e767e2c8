/* A program that uses an installed libmoeclient, as a third party would:
 * only <moeclient.h> from the include directory, -lmoeclient (pkg-config or
 * find_package(moeclient)). Run by tests/install_test.sh.
 *
 * Connects to a socket that does not exist: that must fail with MOE_EDAEMON
 * (not hang, not crash), and moe_strerror() must name it. Exit 0 if so. */
#include <moeclient.h>

#include <stdio.h>

#if !defined(MOECLIENT_VERSION_MAJOR) || MOECLIENT_VERSION_MAJOR != 1
#error "moeclient.h: expected MOECLIENT_VERSION_MAJOR 1"
#endif

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/nonexistent/moed-install-test.sock";
	moe_client *c = NULL;
	int r = moe_connect(path, &c);

	printf("moeclient %d.%d: moe_connect(%s): %d: %s\n", MOECLIENT_VERSION_MAJOR,
	       MOECLIENT_VERSION_MINOR, path, r, moe_strerror(r));
	if (r != MOE_EDAEMON || c != NULL) {
		fprintf(stderr, "expected MOE_EDAEMON (%d) and no handle\n", MOE_EDAEMON);
		return 1;
	}
	if (moe_strerror(MOE_OK)[0] == '\0' ||
	    moe_strerror(r) == moe_strerror(-1000)) { /* "unknown error" */
		fprintf(stderr, "moe_strerror(MOE_EDAEMON) does not name it\n");
		return 1;
	}
	return 0;
}
