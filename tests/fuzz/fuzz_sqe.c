/* tests/fuzz/fuzz_sqe.c — submission-entry validation on arbitrary entries
 * and limits. Whatever it accepts must be safe to execute: both spans inside
 * the data area, an MoE layer, a known dtype, within the token limits, and
 * with MOE_SQE_ROUTING a routing span inside the data area too. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ipc/moe_errors.h"
#include "ipc/moe_proto.h"
#include "ipc/moe_ring.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_sqe q;
	struct {
		uint32_t hidden, max_tokens, max_inflight, n_layers;
		uint64_t data_bytes, layer_mask;
	} g;
	uint8_t is_moe[64];
	struct moe_sqe_limits l;
	int r;

	if (size < sizeof(q) + sizeof(g))
		return 0;
	memcpy(&q, data, sizeof(q));
	memcpy(&g, data + sizeof(q), sizeof(g));
	l.hidden = g.hidden;
	l.data_bytes = g.data_bytes;
	l.max_tokens = g.max_tokens;
	l.max_inflight_tokens = g.max_inflight;
	l.n_layers = g.n_layers % 65;
	l.top_k = (uint32_t)(g.layer_mask >> 52); /* 0..4095: past the 1024 bound too */
	for (uint32_t i = 0; i < 64; i++)
		is_moe[i] = (g.layer_mask >> i) & 1;
	l.is_moe = is_moe;
	r = moe_sqe_validate(&q, &l);
	if (r == 0 && !(q.flags & MOE_SQE_NOP)) {
		uint64_t bytes = (uint64_t)q.n_tokens * l.hidden * (q.dtype ? 2 : 4);

		uint64_t rbytes = (uint64_t)q.n_tokens * l.top_k * 8u;
		bool routing = q.flags & MOE_SQE_ROUTING;

		if (q.dtype > MOE_WIRE_F16 || q.layer >= l.n_layers || !is_moe[q.layer] ||
		    !q.n_tokens || q.n_tokens > l.max_tokens ||
		    q.in_off > l.data_bytes || bytes > l.data_bytes - q.in_off ||
		    q.out_off > l.data_bytes || bytes > l.data_bytes - q.out_off ||
		    (q.in_off | q.out_off) % (q.dtype ? 2 : 4) || (!routing && q.route_off) ||
		    (routing && (l.top_k > 1024 || q.route_off > l.data_bytes ||
				 rbytes > l.data_bytes - q.route_off || q.route_off % 4)))
			abort();
	}
	if (r > 0 || r < MOE_ELIMIT)
		abort();
	return 0;
}
