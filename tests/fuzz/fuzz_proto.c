/* tests/fuzz/fuzz_proto.c — every control-message decoder on arbitrary
 * bytes, and the shared-region layout on arbitrary geometry. A decoder must
 * reject or accept without reading past the datagram, and what it accepts
 * must satisfy the invariants the daemon relies on. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_msg_hdr h;
	struct moe_msg_hello hello;
	struct moe_msg_hello_reply reply;
	struct moe_msg_cancel cancel;
	struct moe_msg_status_reply status;
	struct moe_msg_error error;
	struct moe_shm_layout lay;
	uint8_t *copy = malloc(size ? size : 1); /* exact-size buffer for ASan */

	if (!copy)
		return 0;
	memcpy(copy, data, size);
	if (moe_msg_peek(copy, size, &h) >= 0 && h.len != size - sizeof(h))
		abort();
	if (moe_msg_decode_hello(copy, size, &hello) == 0) {
		if (!hello.sq_entries || hello.sq_entries & (hello.sq_entries - 1) ||
		    hello.cq_entries < hello.sq_entries || hello.cq_entries > MOE_RING_MAX ||
		    memchr(hello.client_name, 0, sizeof(hello.client_name)) == NULL)
			abort();
		if (moe_shm_layout(hello.sq_entries, hello.cq_entries, hello.region_bytes, &lay) ==
			    0 &&
		    (lay.data_off + lay.data_bytes != hello.region_bytes ||
		     lay.cq_off < lay.sq_off + (uint64_t)hello.sq_entries * sizeof(struct moe_sqe)))
			abort();
	}
	if (moe_msg_decode_hello_reply(copy, size, &reply) == 0 &&
	    memchr(reply.family, 0, sizeof(reply.family)) == NULL)
		abort();
	moe_msg_decode_cancel(copy, size, &cancel);
	moe_msg_decode_status_reply(copy, size, &status);
	if (moe_msg_decode_error(copy, size, &error) == 0 &&
	    memchr(error.message, 0, sizeof(error.message)) == NULL)
		abort();
	{
		struct moe_msg_admin ad;
		struct moe_msg_admin_reply ar;
		struct moe_admin_job jd;
		char res[MOE_ADMIN_DATA_MAX];
		uint32_t len = 0;

		if (moe_msg_decode_admin(copy, size, &ad, res, &len) == 0 &&
		    (moe_admin_payload_size(ad.op) < 0 ||
		     len != (uint32_t)moe_admin_payload_size(ad.op)))
			abort();
		if (moe_msg_decode_admin_reply(copy, size, &ar, res, sizeof(res), &len) == 0 &&
		    (memchr(ar.message, 0, sizeof(ar.message)) == NULL || len > sizeof(res)))
			abort();
		if (moe_msg_decode_job_done(copy, size, &jd) == 0 &&
		    memchr(jd.message, 0, sizeof(jd.message)) == NULL)
			abort();
	}
	{
		/* TRACE (client side): every record it accepts lies inside the
		 * message, within the hit limit, hits ascending */
		struct moe_msg_trace th;
		struct moe_trace_record rec;
		static struct moe_trace_hit hits[MOE_TRACE_MAX_HITS];
		static unsigned char recs[MOE_MSG_MAX];
		uint32_t len = 0, off = 0;

		if (moe_msg_decode_trace(copy, size, &th, recs, sizeof(recs), &len) == 0) {
			if (len > size || (th.flags & ~(uint32_t)MOE_TRACE_MSG_END))
				abort();
			for (uint32_t i = 0; i < th.n_records; i++) {
				uint32_t at = off;

				if (moe_trace_record_at(recs, len, &off, &rec, hits))
					break;
				if (off > len || off <= at || rec.n_hits > MOE_TRACE_MAX_HITS ||
				    memchr(rec.client_name, 0, sizeof(rec.client_name)) == NULL)
					abort();
				for (uint32_t k = 1; k < rec.n_hits; k++)
					if (hits[k].expert <= hits[k - 1].expert)
						abort();
			}
		}
	}
	moe_msg_decode_empty(copy, size, MOE_MSG_DOORBELL);
	moe_msg_decode_empty(copy, size, MOE_MSG_STATUS);
	free(copy);
	return 0;
}
