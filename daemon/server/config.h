/* SPDX-License-Identifier: MIT */
/*
 * config.h - moe.yaml: the daemon's configuration file.
 *
 * The file is YAML (libyaml). Every key is documented in moe.yaml.example.
 * Unknown keys, wrong types, out-of-range values, duplicate keys and YAML
 * syntax errors are all errors, reported for humans as
 *
 *	FILE:LINE:COLUMN: key.path: what is wrong
 *
 * with the 1-based line and column of the offending node. Keys of features
 * that are not built yet are refused with "not supported yet" rather than
 * silently ignored, so that a configuration never means more than moed does.
 *
 * Parsing is pure: it never touches the checkpoint, the devices or the
 * network; `moed -t` checks those separately. No global state: two
 * configurations can be loaded at once (e.g. on reload).
 */
#ifndef MOE_DAEMON_CONFIG_H
#define MOE_DAEMON_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Room for one error message, including the FILE:LINE:COLUMN prefix. */
#define MOE_CFG_ERRLEN 512

/* Largest configuration file accepted (a real one is a few KiB). */
#define MOE_CFG_MAX_FILE_BYTES (1u << 20)

#define MOE_CFG_MAX_CPU_RANKS 64 /* devices: cpu:R, R in 1..64 */
#define MOE_CFG_MAX_GPUS      64 /* devices: [ids], ids in 0..63 */

#define MOE_CFG_DEFAULT_SOCKET "/run/moed/moed.sock"

enum moe_cfg_dev_kind {
	MOE_CFG_DEV_CPU = 0,
	MOE_CFG_DEV_CUDA,
};

/* cpu.isa: which CPU kernels to use; whether the CPU has them is checked
 * elsewhere. */
enum moe_cfg_isa {
	MOE_CFG_ISA_AUTO = 0,
	MOE_CFG_ISA_SCALAR,
	MOE_CFG_ISA_AVX2,
	MOE_CFG_ISA_AVX512,
	MOE_CFG_ISA_AVX512BF16,
	MOE_CFG_ISA_AMX,
};

/* cpu.precision: the activations of the CPU experts (backend.h) */
enum moe_cfg_precision {
	MOE_CFG_PRECISION_AUTO = 0, /* bf16 for bf16 models, fp32 otherwise */
	MOE_CFG_PRECISION_BF16,
	MOE_CFG_PRECISION_FP32,
};

/* log.level: the values are the syslog priorities (LOG_ERR ... LOG_DEBUG),
 * so they can be used as the "<N>" prefix that journald reads. */
enum moe_cfg_log_level {
	MOE_CFG_LOG_ERR = 3,
	MOE_CFG_LOG_WARNING = 4,
	MOE_CFG_LOG_NOTICE = 5,
	MOE_CFG_LOG_INFO = 6,
	MOE_CFG_LOG_DEBUG = 7,
};

/*
 * One parsed configuration. Sections mirror the YAML file. Every field holds
 * its default unless the file set it; strings are owned (moe_cfg_free).
 */
struct moe_config {
	char *path; /* the file it came from, or NULL (load_string) */

	struct {
		/* Checkpoint directory. Required. A relative path in a file is
		 * taken relative to the directory of that file. */
		char *path;
		/* Hugging Face model_type override (mixtral, qwen2_moe,
		 * qwen3_moe, olmoe, deepseek_v2, deepseek_v3), or NULL: read
		 * it from the checkpoint's config.json. */
		char *family;
	} model;

	/* devices: cpu | cpu:R | cuda | cuda:all | [gpu ids]. Default cpu. */
	struct {
		enum moe_cfg_dev_kind kind;
		unsigned int n_ranks;              /* CPU ranks, or GPUs listed in gpu_ids */
		bool all_gpus;                     /* cuda, cuda:all: every visible GPU */
		uint8_t gpu_ids[MOE_CFG_MAX_GPUS]; /* (n_ranks) when listed */
	} devices;

	struct {
		unsigned int threads; /* 0..1024; 0 = all online cores */
		enum moe_cfg_isa isa; /* default auto */
		enum moe_cfg_precision precision; /* default auto */
	} cpu;

	struct {
		unsigned int spare_slots;          /* per rank per layer, default 0 */
		bool auto_rebalance;               /* default false */
		double rebalance_threshold;        /* max/mean load, > 1.0; 1.5 */
		unsigned int rebalance_interval_s; /* 1..86400, default 60 */
		unsigned int stats_window_s;       /* load statistics' window, 1..86400, default 60 */
		uint64_t copy_bytes_per_s;         /* weight copies of placement changes: at most
		                                      this rate, 0..1 TiB/s; 0 (default): none */
	} placement;

	struct {
		uint64_t max_staging_bytes; /* a reload's second copy plus the kept
					       previous weights: at most this; 0 (the
					       default): a quarter of the host's memory */
		bool keep_previous;	    /* keep what a reload replaced (rollback);
					       default true */
		uint64_t bytes_per_s;	    /* a reload's reads, at most; 0 (default): unpaced */
	} reload;

	struct {
		unsigned int max_batch_tokens;   /* 1..1048576, default 4096 */
		unsigned int batch_window_us;    /* 0..1000000, default 200 */
		unsigned int max_queue_requests; /* 1..1000000, default 4096 */
		unsigned int request_timeout_ms; /* 0..3600000 (0 = none), 30000 */
	} scheduler;

	struct {
		char *socket;                       /* default MOE_CFG_DEFAULT_SOCKET */
		unsigned int socket_mode;           /* 0..0777, default 0660 */
		char *group;                        /* "" = the daemon's own group */
		char *admin_group;                  /* "" = root only */
		unsigned int max_clients;           /* 1..65536, default 64 */
		uint64_t max_client_shm_bytes;      /* 1 MiB..1 TiB, default 1 GiB */
		uint64_t max_total_shm_bytes;       /* all clients' regions: 1 MiB..16 TiB;
						     * 0 (the default): a quarter of the
						     * host's memory (moe_cfg_total_shm) */
		unsigned int max_inflight_requests; /* per client, default 256 */
		unsigned int max_inflight_tokens;   /* per client, default 65536 */
		unsigned int handshake_timeout_ms;  /* connect to HELLO, default 5000 */
	} server;

	struct {
		char *listen;	      /* "host:port" (moe_cfg_parse_listen), "" = no endpoint */
		bool per_expert;      /* per-expert series (layers x experts); default false */
		unsigned int slo_p99_ms; /* exported for the p99 alert, 1..3600000; 250 */
	} metrics;

	struct {
		enum moe_cfg_log_level level; /* default info */
	} log;
};

/*
 * metrics.listen: "ADDR:PORT" with ADDR a numeric IPv4 address, a numeric
 * IPv6 address in brackets ("[::1]:9464") or "localhost" (127.0.0.1), and
 * PORT 0..65535 (0: any free port). Fills @sa (a struct sockaddr_in or
 * _in6, @salen bytes) and returns 0, or -EINVAL with what is wrong in @why.
 */
struct sockaddr;
int moe_cfg_parse_listen(const char *s, struct sockaddr *sa, unsigned int *salen, char *why,
                         size_t whylen);
/*
 * Fill @c with the defaults (model.path stays NULL). Overwrites @c without
 * freeing it. Returns 0, or -ENOMEM; either way moe_cfg_free(@c) is safe.
 */
int moe_cfg_defaults(struct moe_config *c);

/*
 * Parse the configuration file @file into @c (defaults, then the file).
 * Returns 0, or a negative errno with a message in @err: -EINVAL for a bad
 * configuration, -ENOENT/-EACCES/... when the file cannot be read, -EFBIG
 * above MOE_CFG_MAX_FILE_BYTES, -ENOMEM. @c is overwritten, not freed; on
 * error it holds nothing to free (moe_cfg_free is still safe).
 */
int moe_cfg_load_file(const char *file, struct moe_config *c, char *err, size_t errlen);

/*
 * As moe_cfg_load_file, from @len bytes at @yaml (need not be NUL-terminated);
 * @name (or "<string>" when NULL) starts the error messages. Relative paths
 * are kept as written. For tests and fuzzing.
 */
int moe_cfg_load_string(const char *name, const char *yaml, size_t len, struct moe_config *c,
                        char *err, size_t errlen);

/* Free what @c owns and reset it to all zeroes. NULL is a no-op. */
void moe_cfg_free(struct moe_config *c);

/* The name of a cpu.isa / log.level value as written in the file. */
/*
 * A configuration reload: every key whose change applies while serving
 * (its table row says so) takes @next's value in @live; the others keep
 * @live's, and those that differ are listed in @restart ("cpu.threads,
 * devices"), to be reported as needing a restart. Returns how many keys
 * changed in @live. Both configs stay owned by their callers.
 */
int moe_cfg_reload(struct moe_config *live, struct moe_config *next, char *restart, size_t n);

const char *moe_cfg_isa_name(enum moe_cfg_isa isa);
const char *moe_cfg_precision_name(enum moe_cfg_precision p);
const char *moe_cfg_log_level_name(enum moe_cfg_log_level level);

#endif /* MOE_DAEMON_CONFIG_H */
