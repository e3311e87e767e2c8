/* ipc/moe_errors.h — the error codes of the wire and of libmoeclient's
 * public API (one set, negative; 0 is success). Installed beside
 * moeclient.h. */
#ifndef MOE_ERRORS_H
#define MOE_ERRORS_H

#ifdef __cplusplus
extern "C" {
#endif

enum moe_error {
	MOE_OK = 0,
	MOE_EINVAL = -1,     /* invalid argument or field */
	MOE_ENOLAYER = -2,   /* the layer is not an MoE layer of the model */
	MOE_E2BIG = -3,	     /* more tokens than a request may have */
	MOE_ERANGE = -4,     /* buffer outside the shared data area */
	MOE_ETIMEDOUT = -5,  /* the request's deadline passed before it ran */
	MOE_ECANCELED = -6,  /* cancelled before it ran */
	MOE_ESHUTDOWN = -7,  /* the daemon is shutting down or draining */
	MOE_EDAEMON = -8,    /* the daemon is gone or unreachable */
	MOE_EPROTO = -9,     /* protocol error (version, malformed message) */
	MOE_ENOMEM = -10,    /* out of memory (or of shared data area) */
	MOE_EBUSY = -11,     /* too many requests or tokens in flight; another change running */
	MOE_EPERM = -12,     /* not allowed */
	MOE_EINTERNAL = -13, /* the engine failed */
	MOE_EAGAIN = -14,    /* nothing yet (poll) / try again */
	MOE_EDTYPE = -15,    /* unsupported dtype */
	MOE_ENOENT = -16,    /* no such request, job, epoch or replica */
	MOE_ELIMIT = -17,    /* a daemon limit refused the client (clients, memory) */
	MOE_EDEVICE = -18,   /* the device failed; the daemon exits to be restarted */
};

/* A human-readable name for a MOE_E* code (never NULL). Exported from
 * libmoeclient (which is built with hidden visibility). */
__attribute__((visibility("default"))) const char *moe_strerror(int err);

#ifdef __cplusplus
}
#endif

#endif
