/* ipc/moe_proto.h — the wire protocol between moed and its clients.
 *
 * Control: a Unix SOCK_SEQPACKET socket. Every message is one datagram: a
 * fixed header followed by a payload of exactly hdr.len bytes, at most
 * MOE_MSG_MAX bytes in all. Each message type has one decoder
 * (moe_msg_decode_*) that checks the magic, version, type and every length.
 * Large replies (status JSON) travel in a sealed memfd passed with
 * SCM_RIGHTS, never as one large datagram.
 *
 * Data: a shared region (struct moe_shm_hdr, rings, data area) in a memfd the
 * client creates, seals (shrink, grow, seal) and passes with its HELLO. See
 * ipc/moe_ring.h.
 *
 * Every struct here is fixed-size, naturally aligned, little-endian (moed
 * serves local processes only), with explicit reserved fields. libc only.
 */
#ifndef MOE_PROTO_H
#define MOE_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "ipc/moe_admin.h"
#include "ipc/moe_errors.h"

#define MOE_PROTO_MAGIC	  0x3145454du /* "MEE1" */
#define MOE_PROTO_VERSION 1
#define MOE_MSG_MAX	  4096
#define MOE_MAX_MOE_LAYERS 512

enum moe_msg_type {
	MOE_MSG_HELLO = 1,	 /* c->d, + memfd: attach the shared region */
	MOE_MSG_HELLO_REPLY = 2, /* d->c: status + model description */
	MOE_MSG_DOORBELL = 3,	 /* both ways, no payload: look at the rings */
	MOE_MSG_CANCEL = 4,	 /* c->d: cancel a pending request by tag */
	MOE_MSG_STATUS = 5,	 /* c->d: ask for the status JSON */
	MOE_MSG_STATUS_REPLY = 6, /* d->c: status + sealed memfd of JSON */
	MOE_MSG_ERROR = 7,	 /* d->c: a protocol error, then the daemon hangs up */
	MOE_MSG_ADMIN = 8,	 /* c->d: an operator command (ipc/moe_admin.h) */
	MOE_MSG_ADMIN_REPLY = 9, /* d->c: its outcome (+ the op's result) */
	MOE_MSG_JOB_DONE = 10,	 /* d->c: a job the session started is over */
	MOE_MSG_METRICS = 11,	 /* c->d: ask for the metrics (Prometheus text) */
	MOE_MSG_METRICS_REPLY = 12, /* d->c: moe_msg_status_reply + sealed memfd of text */
	MOE_MSG_TRACE = 13,	 /* d->c: moe_msg_trace + trace records (moe_admin.h) */
};

struct moe_msg_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t len; /* payload bytes after this header */
	uint32_t seq; /* echoed in replies */
};

/* HELLO: the region's geometry is the client's claim; the daemon checks it
 * against the memfd's real size and seals. */
struct moe_msg_hello {
	uint32_t sq_entries; /* power of two, 1..MOE_RING_MAX */
	uint32_t cq_entries; /* power of two, >= sq_entries */
	uint64_t region_bytes;
	char client_name[32]; /* for logs and status; NUL-padded */
};

struct moe_msg_hello_reply {
	int32_t status;	       /* 0 or a MOE_E* code */
	uint32_t proto_version;
	char family[16];
	uint32_t hidden;
	uint32_t n_experts;
	uint32_t top_k;
	uint32_t dtype;	       /* the model's weights: enum moe_wire_dtype */
	uint32_t n_layers;     /* decoder layers, dense included */
	uint32_t n_moe_layers;
	uint32_t max_batch_tokens; /* per request */
	uint32_t max_inflight_requests;
	uint32_t max_inflight_tokens;
	uint32_t reserved;
	uint64_t data_off, data_bytes; /* the data area inside the region */
	uint16_t moe_layers[MOE_MAX_MOE_LAYERS]; /* decoder-layer indices */
};

struct moe_msg_cancel {
	uint64_t tag;
};

/* STATUS_REPLY and METRICS_REPLY */
struct moe_msg_status_reply {
	int32_t status;
	uint32_t reserved;
	uint64_t json_bytes; /* length of the JSON (metrics: the text) in the memfd */
};

/* + the op's payload, exactly moe_admin_payload_size(op) bytes */
struct moe_msg_admin {
	uint32_t op;	/* enum moe_admin_op */
	uint32_t flags; /* MOE_ADMIN_* */
};

/* + the op's result, if any (struct moe_admin_job for an op that started a
 * job, struct moe_admin_epoch_info + versions for EPOCH_INFO) */
struct moe_msg_admin_reply {
	int32_t status; /* 0 or MOE_E* (MOE_EPERM: not an administrator) */
	char message[244]; /* for humans: what was applied, what needs a restart */
};

/* The largest payload or result an admin message carries. */
#define MOE_ADMIN_DATA_MAX                                                                 \
	(MOE_MSG_MAX - sizeof(struct moe_msg_hdr) - sizeof(struct moe_msg_admin_reply))

/* TRACE: n_records records follow (struct moe_trace_record + its hits each) */
#define MOE_TRACE_MSG_END 0x1 /* the trace's count is reached: moed detached it */
struct moe_msg_trace {
	uint32_t n_records;
	uint32_t flags; /* MOE_TRACE_MSG_* */
	uint64_t lost;	/* this tracer's records lost so far (the ring overran it) */
};

struct moe_msg_error {
	int32_t status;
	char message[200];
};

enum moe_wire_dtype { MOE_WIRE_F32 = 0, MOE_WIRE_BF16 = 1, MOE_WIRE_F16 = 2 };

/* Encoders: write header + payload into buf (>= MOE_MSG_MAX); return the
 * datagram length. */
size_t moe_msg_encode(void *buf, uint16_t type, uint32_t seq, const void *payload, uint32_t len);

/* Decoders: 0 and the payload copied out, or a negative MOE_E* code.
 * moe_msg_peek checks the header only and returns the type (or < 0). */
int moe_msg_peek(const void *buf, size_t n, struct moe_msg_hdr *hdr);
int moe_msg_decode_hello(const void *buf, size_t n, struct moe_msg_hello *out);
int moe_msg_decode_hello_reply(const void *buf, size_t n, struct moe_msg_hello_reply *out);
int moe_msg_decode_cancel(const void *buf, size_t n, struct moe_msg_cancel *out);
int moe_msg_decode_status_reply(const void *buf, size_t n, struct moe_msg_status_reply *out);
int moe_msg_decode_metrics_reply(const void *buf, size_t n, struct moe_msg_status_reply *out);
int moe_msg_decode_error(const void *buf, size_t n, struct moe_msg_error *out);
/* ADMIN: a known op and flags, and exactly the op's payload (copied to
 * `payload`, which has room for MOE_ADMIN_DATA_MAX bytes; *plen its size);
 * MOE_EINVAL for an unknown op or flag or a payload of the wrong size. */
int moe_msg_decode_admin(const void *buf, size_t n, struct moe_msg_admin *out, void *payload,
			 uint32_t *plen);
/* ADMIN_REPLY: the fixed part, then up to `cap` bytes of result (*rlen). */
int moe_msg_decode_admin_reply(const void *buf, size_t n, struct moe_msg_admin_reply *out,
			       void *result, uint32_t cap, uint32_t *rlen);
int moe_msg_decode_job_done(const void *buf, size_t n, struct moe_admin_job *out);
/* TRACE: the fixed part, then its records (up to `cap` bytes, *rlen), each
 * checked by moe_trace_record_at. */
int moe_msg_decode_trace(const void *buf, size_t n, struct moe_msg_trace *out, void *records,
			 uint32_t cap, uint32_t *rlen);
/* The record at *off of a TRACE's records (len bytes): 0, *rec and its hits
 * (hits has room for MOE_TRACE_MAX_HITS) copied out, *off moved past it;
 * MOE_EPROTO if it does not fit in len, carries more than
 * MOE_TRACE_MAX_HITS hits, or its hits are not in ascending expert order. */
int moe_trace_record_at(const void *records, uint32_t len, uint32_t *off,
			struct moe_trace_record *rec, struct moe_trace_hit *hits);
/* DOORBELL, STATUS and METRICS carry no payload. */
int moe_msg_decode_empty(const void *buf, size_t n, uint16_t type);

#endif
