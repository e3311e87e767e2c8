/* moe_admin.h — moed's operator commands on the wire: op codes, payloads,
 * replies, jobs. Installed with moeclient.h; libc only.
 *
 * An ADMIN message is struct moe_msg_admin followed by exactly the op's
 * payload (moe_admin_payload_size: 0 for ops without one); anything shorter
 * or longer, an unknown op or an unknown flag is refused with MOE_EINVAL and
 * the session goes on. Its ADMIN_REPLY (same seq) is struct
 * moe_msg_admin_reply followed by the op's result, if it has one.
 *
 * Jobs: an op that starts long work (MOE_ADMIN_EPOCH_CYCLE today; weight
 * copies and reloads next) replies at once with the job's id, runs on a
 * job thread of the daemon, and ends with a JOB_DONE message (struct
 * moe_admin_job) to the session that started it, with the seq of the ADMIN
 * that started it. Meanwhile MOE_ADMIN_JOB_STATUS reads its progress and
 * MOE_ADMIN_JOB_CANCEL stops it at its next step.
 *
 * Privileges: MOE_ADMIN_EPOCH_INFO and MOE_ADMIN_VERSION_INFO are for any
 * client that may forward; every other op is for root or
 * server.admin_group (else MOE_EPERM). MOE_ADMIN_TRACE among them: a trace
 * shows every client's pid, name and routing.
 *
 * Tracing: MOE_ADMIN_TRACE attaches the session as a tracer (at most 8 at
 * once; MOE_EBUSY beyond). From its reply on, the daemon sends the session
 * TRACE messages (ipc/moe_proto.h): struct moe_msg_trace, then n_records
 * records, each a struct moe_trace_record followed by its n_hits struct
 * moe_trace_hit. The records come from a bounded ring in the daemon; a
 * tracer that reads too slowly loses the oldest (moe_msg_trace.lost counts
 * them) and never slows serving.
 */
#ifndef MOE_ADMIN_H
#define MOE_ADMIN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum moe_admin_op {
	MOE_ADMIN_DRAIN = 1,	     /* refuse new requests, finish queued ones */
	MOE_ADMIN_UNDRAIN = 2,	     /* accept requests again */
	MOE_ADMIN_RELOAD_CONFIG = 3, /* re-read the configuration file */
	MOE_ADMIN_EPOCH_INFO = 4,    /* what an epoch id means: moe_admin_epoch -> _epoch_info */
	MOE_ADMIN_EPOCH_CYCLE = 5,   /* job: publish `count` epochs, same placement and
					weights (a self-test of the publish path) */
	MOE_ADMIN_JOB_STATUS = 6,    /* moe_admin_job_ref -> moe_admin_job */
	MOE_ADMIN_JOB_CANCEL = 7,    /* moe_admin_job_ref -> moe_admin_job */
	MOE_ADMIN_PLACEMENT_CYCLE = 8, /* job: publish `count` random valid placements,
					  replicas copied into spare slots and dropped
					  again (a self-test of the placement path; CPU
					  ranks) */
	MOE_ADMIN_REPLICATE = 9,   /* job: moe_admin_replica: one more replica of an expert,
				      on a rank (weights copied, then published) */
	MOE_ADMIN_UNREPLICATE = 10, /* job: moe_admin_replica: that replica dropped (not an
				       expert's last one) */
	MOE_ADMIN_REBALANCE = 11,  /* moe_admin_rebalance: a plan from the load window;
				      with MOE_ADMIN_DRY_RUN the plan only (moe_admin_plan,
				      and in words in the message), else a job that moves
				      to it (the plan in words in the message); a plan that
				      changes nothing: moe_admin_plan, no job */
	MOE_ADMIN_RELOAD = 12,	   /* moe_admin_reload: job: new expert weights, layer by
				      layer (daemon/engine/reload.h), or a rollback, or
				      the running reload cancelled */
	MOE_ADMIN_VERSION_INFO = 13, /* moe_admin_version_ref -> moe_admin_version: what a
					layer's weights version is (any forwarding
					client, as EPOCH_INFO) */
	MOE_ADMIN_TRACE = 14,	     /* moe_admin_trace: stream this session per-request
					records (see Tracing above), or stop */
	MOE_ADMIN_OP_MAX = 14
};

/* flags */
#define MOE_ADMIN_WAIT	  0x1 /* drain: reply only once nothing is queued */
#define MOE_ADMIN_DRY_RUN 0x2 /* rebalance: show the plan, change nothing */
#define MOE_ADMIN_FLAGS	  (MOE_ADMIN_WAIT | MOE_ADMIN_DRY_RUN)

/* payloads */
struct moe_admin_epoch {
	uint32_t id;
	uint32_t reserved; /* 0 */
};

struct moe_admin_cycle {
	uint32_t count;	      /* epochs to publish, 1..1000000 */
	uint32_t interval_us; /* pause between two, 0..1000000 */
};

struct moe_admin_placement_cycle {
	uint32_t count;	      /* placements to publish, 1..100000 */
	uint32_t interval_us; /* pause between two, 0..1000000 */
	uint64_t seed;	      /* of the random choices */
};

/* Placement changes name a layer by its decoder-layer index (as status
 * does), an expert by its index, a rank by its number. */
#define MOE_ADMIN_ALL_LAYERS 0xffffffffu

struct moe_admin_replica {
	uint32_t layer;
	uint32_t expert;
	uint32_t rank;
	uint32_t reserved; /* 0 */
};

enum moe_plan_kind { MOE_PLAN_KIND_KEEP = 0, MOE_PLAN_KIND_FULL = 1 };

struct moe_admin_rebalance {
	uint32_t layer; /* or MOE_ADMIN_ALL_LAYERS */
	uint32_t mode;	/* enum moe_plan_kind: KEEP moves as few weights as it can */
};

/* reload: flags */
#define MOE_RELOAD_ATOMIC   0x1 /* stage everything, switch in one epoch */
#define MOE_RELOAD_ROLLBACK 0x2 /* back to the weights the last reload replaced */
#define MOE_RELOAD_CANCEL   0x4 /* stop the running reload (its job ends cancelled) */
#define MOE_RELOAD_FLAGS    (MOE_RELOAD_ATOMIC | MOE_RELOAD_ROLLBACK | MOE_RELOAD_CANCEL)
#define MOE_RELOAD_MAX_LAYER  255  /* decoder-layer indices a reload can name */
#define MOE_RELOAD_MAX_EXPERT 1023 /* expert indices a reload can name */

struct moe_admin_reload {
	uint32_t flags;	       /* MOE_RELOAD_* */
	uint32_t max_parallel; /* layers staged at once, 0..64 (0: 1) */
	uint64_t layers[4];    /* bit i: decoder layer i; none: every MoE layer */
	uint64_t experts[16];  /* bit x: expert x (experts steps); none: whole layers */
	char model[1024];      /* an absolute checkpoint directory, NUL-terminated;
				  "": the configured model.path, read again */
};

/* version-info: version 0 asks for the current one; experts from
 * first_expert on, as many as fit (n_experts in the result). */
struct moe_admin_version_ref {
	uint32_t layer; /* decoder-layer index */
	uint32_t version;
	uint32_t first_expert;
	uint32_t reserved; /* 0 */
};

#define MOE_VERSION_ROLLBACK 0x1 /* made by a rollback */

struct moe_admin_version {
	uint32_t layer, version;
	uint32_t router_version; /* router, correction bias, shared experts */
	uint32_t router_source;	 /* source ids: status' weights.sources */
	uint32_t flags;		 /* MOE_VERSION_* */
	uint32_t total_experts;
	uint32_t first_expert, n_experts;
	/* uint32_t expert_version[n_experts]; uint32_t expert_source[n_experts]; */
};

/* trace: which requests (all filters must match), and how many */
#define MOE_TRACE_STOP 0x1 /* detach this session's tracer (the rest is ignored, 0) */
struct moe_admin_trace {
	uint32_t layer; /* decoder-layer index, or MOE_ADMIN_ALL_LAYERS */
	int32_t pid;	/* only this client process's requests; 0: every client's */
	uint64_t count; /* detach after this many records; 0: until stopped */
	uint32_t flags; /* MOE_TRACE_* */
	uint32_t reserved; /* 0 */
};

/* A trace record's times: the request's own wait in the queue (taken from
 * its ring until its batch started), then the batch's stages (struct
 * moe_stage_times of the engine: one batch serves several requests, each
 * sees the whole batch's stage); device: device backends only, the whole
 * batch on the device. Their sum never exceeds latency_ns. */
enum moe_trace_stage {
	MOE_TRACE_QUEUE,
	MOE_TRACE_CONVERT,
	MOE_TRACE_ROUTER,
	MOE_TRACE_DISPATCH,
	MOE_TRACE_EXCHANGE,
	MOE_TRACE_EXPERTS,
	MOE_TRACE_COMBINE,
	MOE_TRACE_DEVICE,
	MOE_TRACE_STAGES
};

#define MOE_TRACE_TRUNCATED 0x1 /* more experts hit than a record carries */
#define MOE_TRACE_MAX_HITS  480 /* experts a record carries, at most */

struct moe_trace_record {
	uint64_t seq;	     /* the daemon's record number, from 0 (gaps: filtered out, or lost) */
	uint64_t tag;	     /* the request's tag, as its completion carries it */
	uint64_t unix_ns;    /* CLOCK_REALTIME when its completion was posted */
	uint64_t latency_ns; /* taken from the client's ring -> its completion posted */
	uint64_t stage_ns[MOE_TRACE_STAGES];
	int32_t pid;	     /* the client's process (its socket's credentials) */
	uint32_t client;     /* the daemon's session id (as status shows it) */
	char client_name[32]; /* the name the client gave, NUL-terminated */
	uint32_t layer;	     /* decoder-layer index */
	uint32_t tokens;
	uint32_t dtype;	     /* the request's: 0 f32, 1 bf16, 2 f16 (moe_wire_dtype) */
	int32_t status;	     /* 0 or MOE_E* */
	uint32_t epoch;	     /* the epoch it ran on */
	uint32_t weights_version; /* the layer's weights version in that epoch */
	uint32_t batch_requests, batch_tokens; /* the batch it ran in */
	uint32_t n_hits;     /* struct moe_trace_hit[n_hits] follow, ascending expert
				(0: the batch failed, or moed had no memory to record it) */
	uint32_t flags;	     /* MOE_TRACE_TRUNCATED */
};

/* An expert the request's tokens were routed to, and how many of them
 * (the top-k choices: the counts add up to tokens * top_k). */
struct moe_trace_hit {
	uint32_t expert;
	uint32_t tokens;
};

struct moe_admin_job_ref {
	uint32_t job;
	uint32_t reserved; /* 0 */
};

/* results */
#define MOE_EPOCH_CURRENT 0x1
#define MOE_EPOCH_RETIRED 0x2

struct moe_admin_epoch_info {
	uint32_t id;
	uint32_t flags; /* MOE_EPOCH_* */
	uint64_t placement_gen;
	uint32_t n_layers; /* MoE layers: weights_version[n_layers] follows */
	uint32_t reserved;
	/* uint32_t weights_version[n_layers]; */
};

/* rebalance's result (dry run, or nothing to change): what the plan changes. */
struct moe_admin_plan {
	uint32_t layers;	 /* planned */
	uint32_t layers_changed; /* with a replica added, moved or dropped */
	uint32_t added, dropped, moved;
	uint32_t reserved;
	uint64_t copy_bytes; /* weights the move copies */
	double before, after; /* predicted max/mean rank load, the worst layer */
};

enum moe_job_state { MOE_JOB_RUNNING = 1, MOE_JOB_DONE = 2, MOE_JOB_CANCELLED = 3,
		     MOE_JOB_FAILED = 4 };

struct moe_admin_job {
	uint32_t job;
	uint32_t op;
	uint32_t state; /* enum moe_job_state */
	int32_t result; /* 0 or MOE_E* once over */
	uint64_t done, total; /* progress, in the op's steps */
	char message[128];
};

/* The exact payload size of `op`, or -1 for an unknown op. Both exported
 * from libmoeclient (built with hidden visibility). */
__attribute__((visibility("default"))) int moe_admin_payload_size(uint32_t op);
/* The op's name ("drain", "epoch-info", ...) or "?". */
__attribute__((visibility("default"))) const char *moe_admin_op_name(uint32_t op);
/* A job state's name ("running", "done", "cancelled", "failed") or "?". */
__attribute__((visibility("default"))) const char *moe_job_state_name(uint32_t state);

#ifdef __cplusplus
}
#endif

#endif
