#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"

#include <string.h>

static const char *const messages[] = {
	[0] = "success",
	[1] = "invalid argument",
	[2] = "not an MoE layer of this model",
	[3] = "more tokens than a request may have (the client's max_inflight_tokens)",
	[4] = "buffer outside the shared data area",
	[5] = "deadline passed before the request ran",
	[6] = "request cancelled",
	[7] = "daemon shutting down",
	[8] = "daemon gone or unreachable",
	[9] = "protocol error",
	[10] = "out of memory",
	[11] = "busy (too much in flight, or another change running)",
	[12] = "not allowed",
	[13] = "engine failure",
	[14] = "not ready (nothing yet, or nothing to work from)",
	[15] = "unsupported dtype",
	[16] = "not found",
	[17] = "refused by a daemon limit",
	[18] = "the device failed (the daemon restarts)",
};

const char *moe_strerror(int err)
{
	unsigned i = err <= 0 ? 0u - (unsigned)err : ~0u;

	return i < sizeof(messages) / sizeof(messages[0]) ? messages[i] : "unknown error";
}

size_t moe_msg_encode(void *buf, uint16_t type, uint32_t seq, const void *payload, uint32_t len)
{
	struct moe_msg_hdr h = {MOE_PROTO_MAGIC, MOE_PROTO_VERSION, type, len, seq};

	memcpy(buf, &h, sizeof(h));
	if (len)
		memcpy((char *)buf + sizeof(h), payload, len);
	return sizeof(h) + len;
}

int moe_msg_peek(const void *buf, size_t n, struct moe_msg_hdr *hdr)
{
	if (n < sizeof(*hdr) || n > MOE_MSG_MAX)
		return MOE_EPROTO;
	memcpy(hdr, buf, sizeof(*hdr));
	if (hdr->magic != MOE_PROTO_MAGIC || hdr->version != MOE_PROTO_VERSION ||
	    hdr->len != n - sizeof(*hdr))
		return MOE_EPROTO;
	return hdr->type;
}

/* Header valid, type as expected, payload exactly `len` bytes. */
static int decode(const void *buf, size_t n, uint16_t type, void *out, size_t len)
{
	struct moe_msg_hdr h;
	int t = moe_msg_peek(buf, n, &h);

	if (t < 0)
		return t;
	if (t != type || h.len != len)
		return MOE_EPROTO;
	if (len)
		memcpy(out, (const char *)buf + sizeof(h), len);
	return 0;
}

static bool pow2_in(uint32_t v, uint32_t max)
{
	return v && v <= max && !(v & (v - 1));
}

int moe_msg_decode_hello(const void *buf, size_t n, struct moe_msg_hello *out)
{
	int r = decode(buf, n, MOE_MSG_HELLO, out, sizeof(*out));

	if (r)
		return r;
	if (!pow2_in(out->sq_entries, MOE_RING_MAX) || !pow2_in(out->cq_entries, MOE_RING_MAX) ||
	    out->cq_entries < out->sq_entries)
		return MOE_EINVAL;
	out->client_name[sizeof(out->client_name) - 1] = '\0';
	for (size_t i = 0; out->client_name[i]; i++)
		if ((unsigned char)out->client_name[i] < 0x20 ||
		    (unsigned char)out->client_name[i] > 0x7e)
			out->client_name[i] = '?'; /* it goes into logs */
	return 0;
}

int moe_msg_decode_hello_reply(const void *buf, size_t n, struct moe_msg_hello_reply *out)
{
	int r = decode(buf, n, MOE_MSG_HELLO_REPLY, out, sizeof(*out));

	if (r)
		return r;
	out->family[sizeof(out->family) - 1] = '\0';
	if (out->status == 0 && (out->n_moe_layers > MOE_MAX_MOE_LAYERS || !out->hidden ||
				 out->dtype > MOE_WIRE_F16))
		return MOE_EPROTO;
	return 0;
}

int moe_msg_decode_cancel(const void *buf, size_t n, struct moe_msg_cancel *out)
{
	return decode(buf, n, MOE_MSG_CANCEL, out, sizeof(*out));
}

int moe_msg_decode_status_reply(const void *buf, size_t n, struct moe_msg_status_reply *out)
{
	return decode(buf, n, MOE_MSG_STATUS_REPLY, out, sizeof(*out));
}

int moe_msg_decode_metrics_reply(const void *buf, size_t n, struct moe_msg_status_reply *out)
{
	return decode(buf, n, MOE_MSG_METRICS_REPLY, out, sizeof(*out));
}

int moe_msg_decode_error(const void *buf, size_t n, struct moe_msg_error *out)
{
	int r = decode(buf, n, MOE_MSG_ERROR, out, sizeof(*out));

	if (!r)
		out->message[sizeof(out->message) - 1] = '\0';
	return r;
}

/* Header valid, type as expected, payload at least `len` bytes and at most
 * `len + cap`: the fixed part goes to out, the rest to rest (*rlen). */
static int decode_var(const void *buf, size_t n, uint16_t type, void *out, size_t len,
		      void *rest, uint32_t cap, uint32_t *rlen)
{
	struct moe_msg_hdr h;
	int t = moe_msg_peek(buf, n, &h);

	if (t < 0)
		return t;
	if (t != type || h.len < len)
		return MOE_EPROTO;
	memcpy(out, (const char *)buf + sizeof(h), len);
	*rlen = (uint32_t)(h.len - len);
	if (*rlen > cap)
		return MOE_EINVAL; /* (the fixed part and the length are filled in) */
	if (*rlen)
		memcpy(rest, (const char *)buf + sizeof(h) + len, *rlen);
	return 0;
}

static const struct {
	const char *name;
	int payload;
} admin_ops[MOE_ADMIN_OP_MAX + 1] = {
	[MOE_ADMIN_DRAIN] = {"drain", 0},
	[MOE_ADMIN_UNDRAIN] = {"undrain", 0},
	[MOE_ADMIN_RELOAD_CONFIG] = {"reload-config", 0},
	[MOE_ADMIN_EPOCH_INFO] = {"epoch-info", sizeof(struct moe_admin_epoch)},
	[MOE_ADMIN_EPOCH_CYCLE] = {"epoch-cycle", sizeof(struct moe_admin_cycle)},
	[MOE_ADMIN_JOB_STATUS] = {"job-status", sizeof(struct moe_admin_job_ref)},
	[MOE_ADMIN_JOB_CANCEL] = {"job-cancel", sizeof(struct moe_admin_job_ref)},
	[MOE_ADMIN_PLACEMENT_CYCLE] = {"placement-cycle",
				       sizeof(struct moe_admin_placement_cycle)},
	[MOE_ADMIN_REPLICATE] = {"replicate", sizeof(struct moe_admin_replica)},
	[MOE_ADMIN_UNREPLICATE] = {"unreplicate", sizeof(struct moe_admin_replica)},
	[MOE_ADMIN_REBALANCE] = {"rebalance", sizeof(struct moe_admin_rebalance)},
	[MOE_ADMIN_RELOAD] = {"reload", sizeof(struct moe_admin_reload)},
	[MOE_ADMIN_VERSION_INFO] = {"version-info", sizeof(struct moe_admin_version_ref)},
	[MOE_ADMIN_TRACE] = {"trace", sizeof(struct moe_admin_trace)},
};

int moe_admin_payload_size(uint32_t op)
{
	return op && op <= MOE_ADMIN_OP_MAX ? admin_ops[op].payload : -1;
}

const char *moe_admin_op_name(uint32_t op)
{
	return op && op <= MOE_ADMIN_OP_MAX ? admin_ops[op].name : "?";
}

const char *moe_job_state_name(uint32_t state)
{
	static const char *const names[] = {
		[MOE_JOB_RUNNING] = "running", [MOE_JOB_DONE] = "done",
		[MOE_JOB_CANCELLED] = "cancelled", [MOE_JOB_FAILED] = "failed"};

	return state < sizeof(names) / sizeof(names[0]) && names[state] ? names[state] : "?";
}

int moe_msg_decode_admin(const void *buf, size_t n, struct moe_msg_admin *out, void *payload,
			 uint32_t *plen)
{
	int r = decode_var(buf, n, MOE_MSG_ADMIN, out, sizeof(*out), payload,
			   (uint32_t)MOE_ADMIN_DATA_MAX, plen);

	if (r)
		return r;
	if (moe_admin_payload_size(out->op) < 0 || out->flags & ~(uint32_t)MOE_ADMIN_FLAGS ||
	    *plen != (uint32_t)moe_admin_payload_size(out->op))
		return MOE_EINVAL;
	return 0;
}

int moe_msg_decode_admin_reply(const void *buf, size_t n, struct moe_msg_admin_reply *out,
			       void *result, uint32_t cap, uint32_t *rlen)
{
	int r = decode_var(buf, n, MOE_MSG_ADMIN_REPLY, out, sizeof(*out), result, cap, rlen);

	if (!r)
		out->message[sizeof(out->message) - 1] = '\0';
	return r;
}

int moe_msg_decode_job_done(const void *buf, size_t n, struct moe_admin_job *out)
{
	int r = decode(buf, n, MOE_MSG_JOB_DONE, out, sizeof(*out));

	if (!r)
		out->message[sizeof(out->message) - 1] = '\0';
	return r;
}

_Static_assert(sizeof(struct moe_trace_record) == 176, "trace record layout");
_Static_assert(sizeof(struct moe_admin_trace) == 24, "trace payload layout");
/* a record with every hit it may carry fits one TRACE message */
_Static_assert(sizeof(struct moe_msg_hdr) + sizeof(struct moe_msg_trace) +
		       sizeof(struct moe_trace_record) +
		       MOE_TRACE_MAX_HITS * sizeof(struct moe_trace_hit) <= MOE_MSG_MAX,
	       "trace record too large for a message");

int moe_msg_decode_trace(const void *buf, size_t n, struct moe_msg_trace *out, void *records,
			 uint32_t cap, uint32_t *rlen)
{
	int r = decode_var(buf, n, MOE_MSG_TRACE, out, sizeof(*out), records, cap, rlen);

	if (!r && (out->flags & ~(uint32_t)MOE_TRACE_MSG_END))
		return MOE_EPROTO;
	return r;
}

int moe_trace_record_at(const void *records, uint32_t len, uint32_t *off,
			struct moe_trace_record *rec, struct moe_trace_hit *hits)
{
	const char *p = records;
	uint64_t need;

	if (*off > len || len - *off < sizeof(*rec))
		return MOE_EPROTO;
	memcpy(rec, p + *off, sizeof(*rec));
	need = sizeof(*rec) + (uint64_t)rec->n_hits * sizeof(*hits);
	if (rec->n_hits > MOE_TRACE_MAX_HITS || len - *off < need)
		return MOE_EPROTO;
	memcpy(hits, p + *off + sizeof(*rec), rec->n_hits * sizeof(*hits));
	for (uint32_t i = 1; i < rec->n_hits; i++)
		if (hits[i].expert <= hits[i - 1].expert)
			return MOE_EPROTO;
	rec->client_name[sizeof(rec->client_name) - 1] = '\0';
	*off += (uint32_t)need;
	return 0;
}

int moe_msg_decode_empty(const void *buf, size_t n, uint16_t type)
{
	return decode(buf, n, type, NULL, 0);
}

int moe_shm_layout(uint32_t sq_entries, uint32_t cq_entries, uint64_t region_bytes,
		   struct moe_shm_layout *out)
{
	uint64_t sq_end, cq_end;

	if (!pow2_in(sq_entries, MOE_RING_MAX) || !pow2_in(cq_entries, MOE_RING_MAX) ||
	    cq_entries < sq_entries)
		return MOE_EINVAL;
	out->sq_off = MOE_SHM_HDR_BYTES;
	sq_end = out->sq_off + (uint64_t)sq_entries * sizeof(struct moe_sqe);
	out->cq_off = (sq_end + 63) & ~(uint64_t)63;
	cq_end = out->cq_off + (uint64_t)cq_entries * sizeof(struct moe_cqe);
	out->data_off = (cq_end + 4095) & ~(uint64_t)4095;
	if (region_bytes <= out->data_off)
		return MOE_EINVAL;
	out->data_bytes = region_bytes - out->data_off;
	return 0;
}

int moe_sqe_validate(const struct moe_sqe *q, const struct moe_sqe_limits *l)
{
	uint64_t bytes;

	if (q->flags & ~MOE_SQE_FLAGS || (!(q->flags & MOE_SQE_ROUTING) && q->route_off))
		return MOE_EINVAL;
	if (q->flags & MOE_SQE_NOP)
		return 0;
	if (q->dtype > MOE_WIRE_F16)
		return MOE_EDTYPE;
	if (q->layer >= l->n_layers || !l->is_moe[q->layer])
		return MOE_ENOLAYER;
	if (q->n_tokens == 0)
		return MOE_EINVAL;
	if (q->n_tokens > l->max_tokens)
		return MOE_E2BIG;
	/* n_tokens < 2^32, hidden < 2^32, size <= 4: fits 64 bits */
	bytes = (uint64_t)q->n_tokens * l->hidden * (q->dtype == MOE_WIRE_F32 ? 4u : 2u);
	if (!moe_span_ok(q->in_off, bytes, l->data_bytes) ||
	    !moe_span_ok(q->out_off, bytes, l->data_bytes))
		return MOE_ERANGE;
	/* the buffers are read and written in place as arrays of their dtype
	 * (the data area is page-aligned): an offset that is not a multiple of
	 * the element size would be a misaligned access */
	if ((q->in_off | q->out_off) & (q->dtype == MOE_WIRE_F32 ? 3u : 1u))
		return MOE_EINVAL;
	if (q->flags & MOE_SQE_ROUTING) {
		/* < 2^32 * 2^32 * 8 would not fit: bound top_k first */
		if (l->top_k > 1024)
			return MOE_EINVAL;
		bytes = (uint64_t)q->n_tokens * l->top_k * 8u;
		if (!moe_span_ok(q->route_off, bytes, l->data_bytes))
			return MOE_ERANGE;
		if (q->route_off & 3u)
			return MOE_EINVAL;
	}
	return 0;
}
