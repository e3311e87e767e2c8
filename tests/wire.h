/* tests/wire.h — a client that speaks moed's wire protocol by hand
 * (ipc/moe_proto.h, ipc/moe_ring.h), not through libmoeclient, so that the
 * tests can lie and misbehave in ways the library never would; and the
 * bit-for-bit check of outputs against the in-process engine
 * (tests/daemon_harness.h). Shared by test_daemon and test_hostile.
 *
 * Every call that can fail fails the running cmocka test; every wait is
 * bounded (DH_EXIT_MS to hear from moed, DH_WAIT_MS for completions).
 */
#ifndef MOE_TESTS_WIRE_H
#define MOE_TESTS_WIRE_H

#include <fcntl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"
#include "tests/daemon_harness.h"

#define WIRE_MAX_RAW 64
#define SEALS	     (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

/* An attached raw client: its socket and its mapping of the region. */
struct raw {
	int sock;
	void *map;
	uint64_t bytes;
	struct moe_shm_hdr *hdr;
	struct moe_sqe *sq;
	struct moe_cqe *cq;
	unsigned char *data;
	uint64_t data_bytes;
	uint32_t entries, sq_tail, cq_head;
	struct moe_msg_hello_reply rep;
};

const char *dt_name(int dt);
/* out must be exactly what the in-process engine gives for in. */
void check_output(uint32_t layer, int dt, const void *in, const void *out, uint32_t n,
		  const char *what);

/* A connected socket to d (fails the test otherwise). */
int raw_connect(struct daemon *d);
/* One datagram with fds; 0 or -errno (never blocks). */
int raw_sendmsg(int fd, const void *buf, size_t len, const int *fds, int nfds);
/* A message of `type` (seq 7) with fds; 0 or -errno. */
int raw_send(int fd, uint16_t type, const void *payload, uint32_t len, const int *fds, int nfds);
/* The daemon must answer with a refusal (HELLO_REPLY with an error status or
 * ERROR) and hang up. Closes fd. Returns the refusal's status. */
int expect_refused(int fd, const char *what);
/* A region memfd of `bytes` with `seals`, its header written for `entries`
 * ring entries (entries 0: no header). */
int make_memfd(uint64_t bytes, int seals, uint32_t entries);
void fill_hello(struct moe_msg_hello *h, uint32_t entries, uint64_t bytes);
/* HELLO with `fd` (or none, fd < 0) for a region of `bytes`; then the
 * daemon must refuse and hang up. Returns the refusal's status. */
int hello_refused(struct daemon *d, int fd, uint32_t entries, uint64_t bytes, const char *what);
/* A correct handshake by hand; tracked until raw_close (wire_close_all). */
struct raw *raw_attach(struct daemon *d, uint64_t bytes, uint32_t entries);
void raw_close(struct raw *r);
/* Closes every raw client still open (a test's teardown). */
void wire_close_all(void);
/* Pushes one entry (the ring must have room). */
void raw_push(struct raw *r, const struct moe_sqe *q);
void raw_doorbell(struct raw *r);
/* Reads and drops whatever the daemon sent (doorbells); false at EOF. */
bool raw_drain(struct raw *r);
/* Collects exactly n CQEs (bounded wait); reads the socket meanwhile
 * unless `deaf`. */
void raw_wait(struct raw *r, struct moe_cqe *out, uint32_t n, bool deaf);
struct moe_sqe sqe(uint64_t tag, uint32_t layer, uint32_t n, uint64_t in_off, uint64_t out_off,
		   uint16_t dtype);
/* For forked children acting as another uid (no cmocka there: they report
 * by exit status). child_hello: a connection to `sock` with a HELLO for a
 * sealed region of `bytes` (4 ring entries); the socket, with *status the
 * HELLO_REPLY's status, or -11 (connect, memfd), -12 (header, seals), -13
 * (send), -14 (no or a malformed reply). child_admin: one ADMIN (`op`,
 * exactly `len` payload bytes) and its reply's status in *status (doorbells
 * skipped); 0, or -15 (send), -16 (no or a malformed reply). */
int child_hello(const char *sock, uint64_t bytes, int *status);
int child_admin(int s, uint32_t seq, uint32_t op, const void *payload, uint32_t len, int *status);

/* A real request through a raw client, its output checked. */
void raw_forward_ok(struct raw *r, uint32_t layer, int dt, uint32_t n, uint64_t seed);

#endif
