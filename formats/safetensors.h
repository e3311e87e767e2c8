/* formats/safetensors.h — the safetensors file format, read and written with
 * full validation.
 *
 * Layout: [u64 LE header length N][N bytes of JSON][data buffer]. The reader
 * checks everything the format specifies: N <= 100,000,000, UTF-8 JSON object
 * starting with '{' (leading/trailing whitespace allowed), known dtypes,
 * shapes whose byte size equals the data_offsets span, offsets that tile the
 * buffer from 0 with no hole and no overlap, no duplicate names, and a file
 * size of exactly 8 + N + end of the last tensor. Every error message names
 * the file and, where there is one, the tensor.
 *
 * Tensor data is never mapped: moe_st_pread() copies it into memory the
 * caller owns, so a file rewritten in place cannot SIGBUS the daemon or
 * change weights under it. moe_st_check_identity() tells whether the file
 * still is the one that was opened (device, inode, size, mtime, header hash).
 */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stdint.h>
#include <stddef.h>

#include "formats/errbuf.h"

#define MOE_ST_MAX_HEADER 100000000ull
#define MOE_ST_MAX_DIMS	  8

enum moe_st_dtype {
	MOE_ST_BOOL,
	MOE_ST_U8,
	MOE_ST_I8,
	MOE_ST_I16,
	MOE_ST_U16,
	MOE_ST_F16,
	MOE_ST_BF16,
	MOE_ST_I32,
	MOE_ST_U32,
	MOE_ST_F32,
	MOE_ST_I64,
	MOE_ST_U64,
	MOE_ST_F64,
	MOE_ST_C64,
	MOE_ST_F8_E5M2,
	MOE_ST_F8_E4M3,
	MOE_ST_F8_E8M0,
	MOE_ST_F8_E4M3FNUZ,
	MOE_ST_F8_E5M2FNUZ,
	MOE_ST_F4,
	MOE_ST_F6_E2M3,
	MOE_ST_F6_E3M2,
	MOE_ST_NDTYPES
};

const char *moe_st_dtype_name(enum moe_st_dtype dt);
/* The float dtypes moed computes with, numbered as everywhere else in moed
 * (the engine's enum moe_dtype, the wire's and libmoeclient's): 0 F32,
 * 1 BF16, 2 F16; -1 for any other dtype. */
int moe_st_float_code(enum moe_st_dtype dt);
unsigned moe_st_dtype_bits(enum moe_st_dtype dt);
/* Returns the dtype for a safetensors dtype string, or -1. */
int moe_st_dtype_parse(const char *s);

struct moe_st_tensor {
	char *name;
	enum moe_st_dtype dtype;
	uint32_t ndim;
	uint64_t shape[MOE_ST_MAX_DIMS];
	uint64_t begin, end; /* relative to the start of the data buffer */
};

struct moe_st_header {
	uint32_t n_tensors;
	struct moe_st_tensor *tensors; /* sorted by name */
	uint32_t n_meta;
	char **meta_keys, **meta_vals; /* __metadata__, string -> string */
};

/* Parses and validates a header of `len` bytes for a data buffer of
 * `data_len` bytes. `what` names the source in messages. Pure: the fuzz
 * target drives it directly. */
int moe_st_parse_header(const char *what, const char *json, size_t len, uint64_t data_len,
			struct moe_st_header *h, char *err);
void moe_st_header_free(struct moe_st_header *h);
const char *moe_st_meta(const struct moe_st_header *h, const char *key);

struct moe_st_identity {
	uint64_t dev, ino, size;
	int64_t mtime_ns;
	uint64_t header_hash;
};

struct moe_st_file {
	char *path;
	int fd;
	uint64_t header_len;
	uint64_t data_start; /* 8 + header_len */
	struct moe_st_identity id;
	struct moe_st_header hdr;
};

int moe_st_open(const char *path, struct moe_st_file **out, char *err);
void moe_st_close(struct moe_st_file *f);
const struct moe_st_tensor *moe_st_find(const struct moe_st_file *f, const char *name);
uint64_t moe_st_numel(const struct moe_st_tensor *t);

/* Copies `len` bytes at byte offset `off` of tensor `t` into dst. A short
 * read (the file shrank) is an error that names the file and tensor. */
int moe_st_pread(const struct moe_st_file *f, const struct moe_st_tensor *t, uint64_t off,
		 uint64_t len, void *dst, char *err);

/* 0 if the open file is still the one that was validated at open time
 * (same device, inode, size, mtime, and header bytes), else -ESTALE. */
int moe_st_check_identity(const struct moe_st_file *f, char *err);

/* 64-bit FNV-1a: the header hash of a checkpoint's identity. */
uint64_t moe_st_hash(const void *p, size_t n, uint64_t h);

/* Writer. Tensors are written in the order given; the header is padded with
 * spaces to a multiple of 8 bytes so the data buffer starts 8-aligned.
 * meta: NULL or a NULL-terminated list of key, value, key, value, ... */
struct moe_st_wtensor {
	const char *name;
	enum moe_st_dtype dtype;
	uint32_t ndim;
	uint64_t shape[MOE_ST_MAX_DIMS];
	const void *data;
};
int moe_st_write(const char *path, const struct moe_st_wtensor *t, size_t n,
		 const char *const *meta, char *err);

#endif
