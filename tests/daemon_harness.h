/* tests/daemon_harness.h — the harness shared by the suites that run a real
 * moed (test_daemon, test_ops).
 *
 * Each test starts its own moed (MOE_BIN_DIR/moed) on a socket in a fresh
 * temporary directory, with its stderr in a file there (dh_dump_log() prints
 * it, with every sd_notify message received), and stops it with SIGTERM,
 * checking exit code 0. The daemons and libmoeclient clients a test opens
 * are tracked (g_daemons, g_clients) so that dh_teardown() can kill and
 * close what a failing test left behind.
 *
 * The in-process reference (g_model, g_eng, g_H) is the same fixture through
 * daemon/engine/engine.h, built by dh_group_setup().
 *
 * Every wait is bounded; a bound that passes is a failure, never a hang.
 */
#ifndef MOE_DAEMON_HARNESS_H
#define MOE_DAEMON_HARNESS_H

#include <cjson/cJSON.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "tests/testutil.h"

#include "client/include/moeclient.h"

#define DH_MOED	   "" MOE_BIN_DIR "/moed"
#define DH_FIXTURE "" MOE_FIXTURES_DIR "/qwen2_moe_bf16"

/* Bounds for waits that must not hang (generous: sanitizer builds are slow). */
#define DH_EXIT_MS 10000
#define DH_WAIT_MS 30000

#define DH_MAX_DAEMONS 4
#define DH_MAX_CLIENTS 32
#define DH_MAX_ENV     8

/* ---- small helpers ------------------------------------------------------ */

uint64_t dh_now_ms(void);
void dh_nap_ms(int ms);
size_t dh_dt_size(int dt);

/* ---- the in-process reference ------------------------------------------- */

extern struct moe_model *g_model;
extern struct moe_engine *g_eng;
extern uint32_t g_H;

/* cmocka group setup / teardown: opens FIXTURE and an engine on it. */
int dh_group_setup(void **state);
int dh_group_teardown(void **state);

/* The in-process engine on n tokens of dtype dt; fails the test on error. */
void dh_ref_forward(uint32_t layer, int dt, const void *in, void *out, uint32_t n);
/* n tokens of N(0,1) hidden states in dtype dt (malloc'd). */
void *dh_make_input(int dt, uint32_t n, uint64_t seed);

/* ---- daemons ------------------------------------------------------------ */

struct daemon {
	pid_t pid; /* 0: not running */
	char *dir, *sock, *log;
	char *cfg; /* the configuration file, or NULL: --model */
	char *model;
	bool socket_arg; /* pass --socket sock on the command line */
	int ready_ms; /* dh_daemon_start's bound */
	char *env[DH_MAX_ENV]; /* NAME=VALUE for moed, on top of ours */
	int nfd; /* the notify socket, or -1 */
	char *notify_path;
	char *notes; /* every notify datagram received, for the failure dump */
	size_t notes_len;
	uint64_t n_watchdog; /* WATCHDOG=1 messages received */
	char **argv; /* NULL: moed -c cfg, or moed --model model */
};

extern struct daemon *g_daemons[DH_MAX_DAEMONS];
extern moe_client *g_clients[DH_MAX_CLIENTS];
extern bool g_passed; /* set at the end of a test: teardown dumps logs if not */

void dh_dump_log(const struct daemon *d);

/* A daemon on `model` in a fresh temporary directory (moed.sock,
 * moed.stderr there), with an sd_notify socket (`notify`) or not; tracked,
 * not started. No configuration file until dh_daemon_write_cfg(). */
struct daemon *dh_daemon_new(const char *model, bool notify, int ready_ms);
/* (Re)writes DIR/moe.yaml, "model:\n  path: MODEL\n" then `extra`, in place
 * (the path moed was given stays the same). */
void dh_daemon_write_cfg(struct daemon *d, const char *extra);
/* NAME=VALUE in moed's environment. */
void dh_daemon_env(struct daemon *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A started moed on the fixture with --socket, `cfg_extra` (NULL: none) in
 * its moe.yaml and `env` (NULL: none, else one NAME=VALUE) in its
 * environment; tracked. */
struct daemon *dh_fixture_daemon(const char *cfg_extra, const char *env, int ready_ms);
/* A tracked library client named `name` (NULL: the program's name); fails
 * the test with the library's words if it cannot connect. */
moe_client *dh_cl_open_named(struct daemon *d, const char *name);
/* The same with options (errbuf and errbuf_len are the helper's). */
moe_client *dh_cl_open_with(struct daemon *d, const moe_connect_options *o);

/* Forks and execs moed (d->argv, or the default command line); returns at
 * once. */
void dh_daemon_spawn(struct daemon *d);
/* Starts moed; ready = with a notify socket, at once (the caller reads the
 * notify messages), else it accepts a connection and hangs up on garbage
 * (the serving loop runs, and that probe no longer counts against
 * server.max_clients). */
void dh_daemon_start(struct daemon *d);
/* Waits (bounded) until moed exits; returns its wait status. */
int dh_daemon_wait_exit(struct daemon *d, int ms);
void dh_expect_alive(struct daemon *d, const char *after);
/* SIGTERM, and it must exit with code 0. */
void dh_daemon_stop(struct daemon *d);
/* Freezes / thaws the daemon; after dh_daemon_freeze() it has really stopped. */
void dh_daemon_freeze(struct daemon *d);
void dh_daemon_thaw(struct daemon *d);
void dh_daemon_free(struct daemon *d);

/* Entries in /proc/PID/fd. */
int dh_count_fds(pid_t pid);
/* VmRSS of a process, in KiB. */
long dh_rss_kib(pid_t pid);

/* ---- clients under load --------------------------------------------------- */

/* One client's loop: random layers, dtypes and sizes (1-12 tokens), each
 * output compared bit for bit with the in-process reference, completion
 * epochs checked monotone, until *stop. Counts in the struct. */
struct dh_loader {
	struct daemon *d;
	atomic_bool *stop;
	uint64_t requests, failed, wrong, not_monotone, epochs_seen;
	uint32_t first_epoch, last_epoch;
	char why[200];
	int id;
};
void *dh_load_loop(void *loader);
/* n client processes running the loop (the reference engine has no threads
 * of its own, so it survives the fork), ids id0.. (their seeds); stop
 * joins them, prints their counts, asserts none failed or differed, and
 * returns the requests they made. */
#define DH_MAX_LOADERS 8
struct dh_loaders;
struct dh_loaders *dh_loaders_start(struct daemon *d, int n, int id0);
uint64_t dh_loaders_stop(struct dh_loaders *h);

/* ---- per-test setup / teardown ------------------------------------------ */

int dh_setup(void **state);
/* Disconnects the tracked clients. */
void dh_close_clients(void);
/* Kills the tracked daemons, dumps their logs unless g_passed, frees them. */
void dh_reap_daemons(void);
/* Both of the above. */
int dh_teardown(void **state);

/* ---- libmoeclient clients ----------------------------------------------- */

void dh_cl_track(moe_client *c);
void dh_cl_close(moe_client *c);

/* A request submitted on buffers of the data area (zero-copy). */
struct req {
	uint64_t tag;
	uint32_t layer, n;
	int dt;
	void *in, *out; /* in the data area */
	void *copy;	/* the input, private (the reference gets it) */
};

void dh_req_submit(moe_client *c, struct req *q, uint32_t layer, int dt, uint32_t n,
		   uint64_t seed, uint32_t timeout_ms);
void dh_req_free(moe_client *c, struct req *q);

/* ---- status JSON -------------------------------------------------------- */

cJSON *dh_jget(const cJSON *o, const char *key, int type);
double dh_jnum(const cJSON *o, const char *key);
/* The parsed status JSON; `check_len`: the length moe_status_json gives
 * must be the string's. */
cJSON *dh_status(moe_client *c, bool check_len);

/* ---- raw connections ---------------------------------------------------- */

/* A connected SOCK_SEQPACKET socket, or -1. */
int dh_raw_socket(const char *path);

extern int *g_resets; /* if set: counts ECONNRESETs seen by dh_raw_recv */

/* One datagram: > 0 its length, 0 at EOF, -ETIMEDOUT. Received fds are
 * closed. */
ssize_t dh_raw_recv(int fd, void *buf, size_t cap, int ms);
/* Reads until the daemon hangs up (true) or `ms` pass (false). *status
 * (may be NULL) gets the status of the first HELLO_REPLY or ERROR seen, 1 if
 * none. A zero-length datagram cannot come from moed: 0 means EOF. */
bool dh_raw_hangup(int fd, int ms, int *status);

#endif
