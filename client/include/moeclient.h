/* moeclient.h — libmoeclient, the client library of moed.
 *
 * A client connects to moed's control socket, shares a memory region with
 * it (a sealed memfd holding a submission ring, a completion ring and a data
 * area) and runs MoE layers on hidden states it places in that data area.
 *
 *   moe_client *c;
 *   moe_model_info mi;
 *   if (moe_connect(NULL, &c) == 0 && moe_get_model_info(c, &mi) == 0)
 *           rc = moe_forward(c, mi.moe_layers[0], MOE_DTYPE_BF16, in, out, n);
 *
 * Errors: every function returning int returns 0 (or, where documented, a
 * count >= 0) on success and a negative MOE_E* code (moe_errors.h) on
 * failure; moe_strerror() names it. The same codes travel on the wire, so a
 * request's completion status is one of them too.
 *
 * Threads: every function may be called from several threads on the same
 * client; an internal mutex serializes them, and no call holds it while it
 * sleeps. Completions reaped by one thread (moe_poll, or any waiting call)
 * are kept in a table of outstanding tags, so another thread's moe_wait
 * sees them. A completion is delivered once: by moe_wait for its tag, or
 * else by moe_poll (which skips tags some thread is waiting for).
 *
 * Tags: moe_submit assigns each request a tag, unique for the life of the
 * client (reconnections included). The tag stays in the table until its
 * completion is delivered; a client holds at most queue_depth such tags
 * (submits beyond that return MOE_EBUSY), and the daemon's per-client
 * limits (max_inflight_requests / max_inflight_tokens) are respected.
 *
 * Daemon gone: when the daemon exits or hangs up, every request outstanding
 * completes with MOE_EDAEMON and every call returns MOE_EDAEMON; nothing
 * hangs and no SIGPIPE is raised. moe_reconnect() connects again with the
 * same options and a new region; with auto_reconnect set, the next call
 * after MOE_EDAEMON does so first. Buffers from moe_buf_alloc stay valid
 * across a reconnection (same addresses, same contents); completions of
 * requests that failed with MOE_EDAEMON can still be collected.
 *
 * Not fork-safe: a child must connect its own client.
 *
 * ABI: libmoeclient.so.1. Every public struct has fixed-width fields only
 * (no enum, int, long or size_t inside: their sizes are the compiler's,
 * a hazard for every FFI); tests/test_abi.c pins their layouts. New
 * fields go into a struct's reserved words (which must be zero) or, for
 * moe_forward_args, after its size field's current value.
 */
#ifndef MOECLIENT_H
#define MOECLIENT_H

#include <stddef.h>
#include <stdint.h>

#include <moe_admin.h>
#include <moe_errors.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && __GNUC__ >= 4
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

#define MOECLIENT_VERSION_MAJOR 1
#define MOECLIENT_VERSION_MINOR 0

typedef struct moe_client moe_client;

/* The element type of hidden states (the wire's enum moe_wire_dtype). The
 * structs below hold it as a uint32_t. */
typedef enum { MOE_DTYPE_F32 = 0, MOE_DTYPE_BF16 = 1, MOE_DTYPE_F16 = 2 } moe_dtype;

typedef struct {
	char family[16]; /* e.g. "qwen2_moe", NUL-terminated */
	uint32_t hidden; /* elements per token */
	uint32_t n_experts;
	uint32_t top_k;
	uint32_t n_layers;              /* decoder layers, dense included */
	uint32_t n_moe_layers;          /* valid entries of moe_layers */
	uint16_t moe_layers[512];       /* the layer indices moe_forward accepts */
	uint32_t dtype;                 /* moe_dtype of the experts' weights */
	uint32_t max_batch_tokens;      /* per batch; a larger request is split
	                                   by the daemon (same result) */
	uint32_t max_inflight_requests; /* per client, 0: no limit */
	uint32_t max_inflight_tokens;   /* per client, 0: no limit */
	uint64_t data_bytes;            /* size of the shared data area */
} moe_model_info;

/* Zero-initialize, then set what you need: a zero field takes its default. */
typedef struct {
	uint64_t region_bytes;  /* the shared region; default 64 MiB */
	uint32_t queue_depth;   /* ring entries (rounded up to a power of two,
	                           at most 4096); default 256 */
	uint32_t auto_reconnect; /* nonzero: reconnect on the call after MOE_EDAEMON */
	const char *name;       /* shown in moectl status; default the program name */
	char *errbuf;           /* if not NULL: why a connect failed, for humans */
	uint64_t errbuf_len;    /* e.g. "/run/moed/moed.sock: connect: No such file..." */
	uint32_t connect_timeout_ms; /* while the socket is missing or refuses
	                           (moed starting), retry this long; 0: once */
	uint32_t reserved[7];   /* zero */
} moe_connect_options;

/* Connects to the daemon. socket_path NULL: $MOED_SOCKET, else
 * /run/moed/moed.sock. MOE_EDAEMON if the daemon cannot be reached (errno
 * then holds the system's reason, e.g. ENOENT or ECONNREFUSED; with
 * connect_timeout_ms, after retrying that long), MOE_EPERM if the socket
 * refuses us, the daemon's status if it refuses the handshake (e.g.
 * MOE_ELIMIT), MOE_EPROTO on a protocol mismatch, MOE_EINVAL for nonzero
 * reserved option words. The handshake waits at most 10 s. moed creates
 * its socket file only once it listens, so a client that waits for the
 * file and then connects is not refused. */
MOE_API int moe_connect(const char *socket_path, moe_client **out);
MOE_API int moe_connect_opts(const char *socket_path, const moe_connect_options *o,
                             moe_client **out);
/* Closes the connection and frees everything, buffers included. Requests
 * still outstanding are abandoned (the daemon drops them). NULL is a no-op.
 * No other thread may use the client during or after this call. */
MOE_API void moe_disconnect(moe_client *c);

/* The model description from the last handshake. */
MOE_API int moe_get_model_info(moe_client *c, moe_model_info *info);

/* Runs n_tokens x hidden elements of `in` through MoE layer `layer` into
 * `out` (same dtype and shape; in == out allowed), copying through the
 * shared area, and waits for the result. n_tokens 0 does nothing. A request
 * larger than max_batch_tokens is split by the daemon into batches that all
 * run under one epoch; the result is the unsplit run's.
 * MOE_E2BIG if n_tokens > max_inflight_tokens (the daemon is not asked),
 * MOE_ENOMEM if input and output cannot fit the data area at all,
 * MOE_ENOLAYER if layer is not an MoE layer, MOE_EDTYPE for a bad dtype, or
 * the request's status (MOE_ETIMEDOUT, MOE_ESHUTDOWN, MOE_EDAEMON, ...). */
MOE_API int moe_forward(moe_client *c, uint32_t layer, moe_dtype dtype, const void *in, void *out,
                        uint32_t n_tokens);

/* Zero-copy buffers in the shared data area, 64-byte aligned. NULL if
 * bytes is 0 or no free span is large enough. moe_buf_free(NULL) and of a
 * pointer that is not the start of a live buffer are ignored. */
MOE_API void *moe_buf_alloc(moe_client *c, size_t bytes);
MOE_API void moe_buf_free(moe_client *c, void *p);

/* Queues a request on buffers inside the data area (from moe_buf_alloc; an
 * interior pointer is fine) and returns at once with its tag. Do not touch
 * in_buf or out_buf until it completes. timeout_ms: the deadline for the
 * request to start, 0 for the daemon's default. MOE_EBUSY if the ring, the
 * tag table or the client's in-flight limits are full (collect completions
 * and retry), MOE_ERANGE if a buffer lies outside the data area, and the
 * argument checks of moe_forward. */
MOE_API int moe_submit(moe_client *c, uint32_t layer, moe_dtype dtype, const void *in_buf,
                       void *out_buf, uint32_t n_tokens, uint32_t timeout_ms, uint64_t *tag);

typedef struct {
	uint64_t tag;
	int32_t status; /* 0: the output is in out_buf; else a MOE_E* code, and
	                 * out_buf's contents are unspecified (MOE_EDEVICE: the
	                 * GPU failed mid-batch; the daemon exits and restarts) */
	uint32_t epoch; /* the weights version the request ran on */
} moe_completion;

/* moe_forward_ex: moe_forward with more in and more out. Set `size` to
 * sizeof(moe_forward_args) (fields are only ever added at the end: an
 * older caller's smaller size is understood), zero what you do not use. */
#define MOE_FWD_ROUTING 0x1 /* fill topk_ids and topk_weights */
typedef struct {
	uint32_t size;          /* sizeof(moe_forward_args) */
	uint32_t flags;         /* MOE_FWD_* */
	uint32_t layer;
	uint32_t dtype;         /* moe_dtype of in and out */
	const void *in;         /* [n_tokens, hidden]; any memory */
	void *out;              /* [n_tokens, hidden]; may be `in` */
	uint32_t n_tokens;
	uint32_t timeout_ms;    /* deadline for the request to start; 0: default */
	uint32_t *topk_ids;     /* MOE_FWD_ROUTING: [n_tokens, top_k], the experts
	                           each token was routed to, best first */
	float *topk_weights;    /* MOE_FWD_ROUTING: [n_tokens, top_k], their weights
	                           (after renormalisation and scaling) */
	uint32_t *epoch;        /* if not NULL: the epoch the request ran on */
} moe_forward_args;

/* Returns what moe_forward does, and MOE_EINVAL for a bad size, unknown
 * flags, or MOE_FWD_ROUTING without both buffers. */
MOE_API int moe_forward_ex(moe_client *c, const moe_forward_args *args);

/* Collects up to max finished requests that no thread is waiting for;
 * returns their count (>= 0) or MOE_EDAEMON-style errors. Never blocks. */
MOE_API int moe_poll(moe_client *c, moe_completion *out, int max);

/* Waits up to timeout_ms (< 0: forever) for request `tag`. 0 when it has
 * finished, with *status (may be NULL) its completion code — MOE_EDAEMON
 * included if the daemon died meanwhile; the tag is then forgotten.
 * MOE_ETIMEDOUT if it is still running (wait again or cancel), MOE_ENOENT
 * for an unknown or already delivered tag. */
MOE_API int moe_wait(moe_client *c, uint64_t tag, int timeout_ms, int *status);

/* Asks the daemon to cancel `tag`: if it is still queued it completes with
 * MOE_ECANCELED, if it is already running it completes normally. Either way
 * collect its completion. MOE_ENOENT if the tag is not outstanding. */
MOE_API int moe_cancel(moe_client *c, uint64_t tag);

/* A no-op request through both rings; *round_trip_ns (may be NULL) gets its
 * round trip. Waits at most 10 s (MOE_ETIMEDOUT). */
MOE_API int moe_ping(moe_client *c, uint64_t *round_trip_ns);

/* The daemon's status as JSON: *json is malloc'd and NUL-terminated (free
 * it), *len (may be NULL) its length. Waits at most 10 s. */
MOE_API int moe_status_json(moe_client *c, char **json, size_t *len);

/* The daemon's metrics in the Prometheus text exposition format (what its
 * HTTP endpoint serves, see docs/metrics.md): *text is malloc'd and
 * NUL-terminated (free it), *len (may be NULL) its length. Waits at most
 * 10 s. */
MOE_API int moe_metrics_text(moe_client *c, char **text, size_t *len);

/* After MOE_EDAEMON: connects again with the same path and options and a
 * new region (buffers keep their addresses and contents). 0 at once if the
 * connection is alive. */
MOE_API int moe_reconnect(moe_client *c);

/* Operator commands (moectl drain / undrain / reload-config, ...): the ops,
 * their payloads and results are in moe_admin.h. Every op but
 * MOE_ADMIN_EPOCH_INFO and MOE_ADMIN_VERSION_INFO needs root or the daemon's
 * server.admin_group (else MOE_EPERM). Calls of any kind (status, admin) from several threads
 * overlap; each reply is matched to its call by sequence number. */
typedef struct {
	uint32_t op;	      /* enum moe_admin_op */
	uint32_t flags;	      /* MOE_ADMIN_WAIT: for drain, answer once nothing is queued */
	const void *payload;  /* exactly the op's payload (moe_admin_payload_size) */
	uint32_t payload_len;
	int32_t timeout_ms;   /* < 0: wait forever */
	uint32_t wait_job;    /* an op that starts a job: return once it is over */
} moe_admin_req;

typedef struct {
	int32_t status;	      /* 0 or MOE_E*, as returned */
	char message[244];    /* the daemon's words: what was applied, why refused */
	uint32_t result_len;  /* the op's result (moe_admin.h), raw */
	unsigned char result[3832];
	struct moe_admin_job job; /* a job: as started, or with wait_job as it ended */
} moe_admin_res;

MOE_API int moe_admin_call(moe_client *c, const moe_admin_req *req, moe_admin_res *res);

/* The payload-less ops in one line: op MOE_ADMIN_DRAIN, _UNDRAIN,
 * _RELOAD_CONFIG; msg (may be NULL) gets the daemon's words. */
MOE_API int moe_admin(moe_client *c, uint32_t op, uint32_t flags, int timeout_ms, char *msg,
		      size_t msglen);

/* What epoch `id` (a completion's epoch) means: placement generation,
 * current or retired, and up to `cap` per-MoE-layer weights versions. Any
 * client may ask. MOE_ENOENT: unknown or older than the daemon remembers. */
MOE_API int moe_epoch_info(moe_client *c, uint32_t id, struct moe_admin_epoch_info *info,
			   uint32_t *versions, uint32_t cap);

/* A job's progress (cancel = 0) or its cancellation (cancel = 1: it stops
 * at its next step; its JOB_DONE goes to the session that started it). */
MOE_API int moe_job(moe_client *c, uint32_t job, int cancel, struct moe_admin_job *out);

/* ---- Tracing (administrators: root or server.admin_group) ----
 *
 * moe_trace_start makes this session a tracer: from then on moed sends it
 * a record of every request that runs and matches the filters (struct
 * moe_admin_trace in moe_admin.h: a layer, a client pid, a count), which
 * moe_trace_next returns one at a time. Records that arrive while nobody
 * reads are queued here (up to 256 messages, a few thousand records; beyond
 * that they are dropped and counted) and in moed's ring; a tracer that
 * reads too slowly loses records, counted in `lost`, and never slows
 * serving. A traced session can still make other calls; use one session
 * per tracer. moe_trace_stop (or closing the client) detaches it. */
typedef struct {
	struct moe_trace_record rec;
	struct moe_trace_hit hits[MOE_TRACE_MAX_HITS]; /* rec.n_hits of them */
	uint64_t lost; /* records lost to this tracer so far: overrun in moed's ring,
			  or dropped by this library's queue */
} moe_trace_event;

/* MOE_EPERM: not an administrator; MOE_EBUSY: 8 tracers attached already;
 * MOE_ENOLAYER: the filter's layer is not an MoE layer. */
MOE_API int moe_trace_start(moe_client *c, const struct moe_admin_trace *filter);
/* The next record: 0; MOE_ETIMEDOUT (timeout_ms passed, < 0: wait
 * forever); MOE_ENOENT: not tracing, or the filter's count has been
 * returned; MOE_EPROTO: a malformed message (skipped). */
MOE_API int moe_trace_next(moe_client *c, moe_trace_event *ev, int timeout_ms);
/* Detaches the tracer; records still queued here are discarded. */
MOE_API int moe_trace_stop(moe_client *c);

/* moe_strerror(int) is declared in moe_errors.h. */

#ifdef __cplusplus
}
#endif

#endif
