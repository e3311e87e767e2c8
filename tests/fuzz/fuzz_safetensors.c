// SPDX-License-Identifier: MIT
/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors reader.
 *
 * The input is a whole file. It goes to moe_st_parse_header() directly (the
 * pure part), then through moe_st_open() from a memfd (the framing, the
 * length prefix and the file size), and every tensor of an accepted file is
 * read back. Oracles beyond the sanitizers:
 *  - the two paths agree on accepting the input;
 *  - an accepted header's tensors tile the data buffer and lie inside it,
 *    and pread returns exactly the input's bytes;
 *  - a refusal comes with a message that names the source.
 * Seeds: tests/fuzz/corpus/safetensors/.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdio.h>

#include "formats/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define WHAT "fuzz.safetensors"

static void check_msg(const char *err, const char *what)
{
	if (!memchr(err, '\0', MOE_ERRLEN) || !strstr(err, what))
		__builtin_trap();
}

/* Returns 1 if the header was accepted, 0 if refused, -1 if not tried. */
static int parse_direct(const uint8_t *data, size_t size)
{
	struct moe_st_header h;
	char err[MOE_ERRLEN];
	uint64_t n = 0, pos = 0;
	int rc;

	if (size < 8)
		return -1;
	for (int i = 7; i >= 0; i--)
		n = (n << 8) | data[i];
	if (n > size - 8 || n > MOE_ST_MAX_HEADER)
		return -1;
	err[0] = '\0';
	rc = moe_st_parse_header(WHAT, (const char *)data + 8, n, size - 8 - n, &h, err);
	if (rc) {
		check_msg(err, WHAT);
		if (h.tensors || h.n_tensors || h.meta_keys)
			__builtin_trap();
		return 0;
	}
	/* sorted by name, tiling [0, data_len) */
	for (uint32_t i = 0; i < h.n_tensors; i++) {
		const struct moe_st_tensor *t = &h.tensors[i];

		if (t->end < t->begin || t->end > size - 8 - n || t->ndim > MOE_ST_MAX_DIMS)
			__builtin_trap();
		if (i && strcmp(h.tensors[i - 1].name, t->name) >= 0)
			__builtin_trap();
		pos += t->end - t->begin;
	}
	if (pos != size - 8 - n)
		__builtin_trap();
	moe_st_header_free(&h);
	return 1;
}

/* The same bytes as a file: /proc/self/fd/N of a memfd, reused across runs. */
static int open_as_file(const uint8_t *data, size_t size, int direct)
{
	static int mfd = -1;
	static char path[64];
	const struct moe_st_tensor *t;
	struct moe_st_file *f;
	char err[MOE_ERRLEN];
	uint8_t *buf;
	int rc;

	if (mfd < 0) {
		mfd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
		if (mfd < 0)
			return -1;
		snprintf(path, sizeof(path), "/proc/self/fd/%d", mfd);
	}
	if (ftruncate(mfd, 0) < 0 || (size && pwrite(mfd, data, size, 0) != (ssize_t)size))
		return -1;
	err[0] = '\0';
	rc = moe_st_open(path, &f, err);
	if (rc) {
		check_msg(err, path);
		/* a header the pure parser accepted fails only on the limit */
		if (direct == 1)
			__builtin_trap();
		return 0;
	}
	if (direct != 1)
		__builtin_trap();
	buf = malloc(size + 1);
	if (!buf)
		abort();
	for (uint32_t i = 0; i < f->hdr.n_tensors; i++) {
		uint64_t nb;

		t = moe_st_find(f, f->hdr.tensors[i].name);
		if (t != &f->hdr.tensors[i])
			__builtin_trap();
		nb = t->end - t->begin;
		if (moe_st_pread(f, t, 0, nb, buf, err) ||
		    memcmp(buf, data + f->data_start + t->begin, nb) != 0)
			__builtin_trap();
		if (moe_st_pread(f, t, nb, 1, buf, err) != -ERANGE)
			__builtin_trap();
	}
	if (moe_st_check_identity(f, err))
		__builtin_trap();
	free(buf);
	moe_st_close(f);
	return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int direct = parse_direct(data, size);

	open_as_file(data, size, direct);
	return 0;
}
