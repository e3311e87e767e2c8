/* tests/test_safetensors.c — the safetensors reader and writer.
 *
 * Every malformed case is a real file in a temporary directory, opened with
 * moe_st_open(): the return code must be the documented one and the message
 * must name the file, the tensor at fault where there is one, and what is
 * wrong (checked by substrings, so wording can improve without breaking
 * the tests as long as the facts stay).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "formats/safetensors.h"
#include "tests/testutil.h"

/* The group's temporary directory. */
static char *tmp;

static int group_setup(void **state)
{
	(void)state;
	tmp = tu_tmpdir();
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	tu_rmtree(tmp);
	free(tmp);
	return 0;
}

/* Writes [u64 LE n][rest] as tmp/name: n need not match the rest. */
static char *raw_file(const char *name, uint64_t n, const void *rest, size_t len)
{
	unsigned char *buf = malloc(8 + len);
	char *path;

	assert_non_null(buf);
	for (int i = 0; i < 8; i++)
		buf[i] = (unsigned char)(n >> (8 * i));
	if (len)
		memcpy(buf + 8, rest, len);
	path = tu_write_file(tmp, name, buf, 8 + len);
	free(buf);
	return path;
}

/* A well-formed framing: [u64 hlen][hdr][dlen bytes of 0xab]. */
static char *st_file(const char *name, const char *hdr, size_t hlen, size_t dlen)
{
	char *buf = malloc(hlen + dlen + 1), *path;

	assert_non_null(buf);
	memcpy(buf, hdr, hlen);
	memset(buf + hlen, 0xab, dlen);
	path = raw_file(name, hlen, buf, hlen + dlen);
	free(buf);
	return path;
}

/* moe_st_open(path) must fail with `code`, and the message must contain the
 * path and every needle (NULL-terminated). */
static void expect_open_fail(const char *path, int code, const char *const *needles)
{
	struct moe_st_file *f = NULL;
	char err[MOE_ERRLEN] = "";
	int ret = moe_st_open(path, &f, err);

	if (ret == 0) {
		moe_st_close(f);
		fail_msg("%s: opened, expected error %d", path, code);
	}
	if (ret != code)
		fail_msg("%s: returned %d, expected %d (%s)", path, ret, code, err);
	if (!strstr(err, path))
		fail_msg("message does not name the file: %s", err);
	for (size_t i = 0; needles[i]; i++)
		if (!strstr(err, needles[i]))
			fail_msg("message lacks \"%s\": %s", needles[i], err);
}

#define NEEDLES(...) ((const char *const[]){__VA_ARGS__, NULL})

/* A header (string literal, may hold NUL bytes) with dlen data bytes that
 * moe_st_open() must refuse with -EINVAL and the given needles. */
#define BAD_HEADER(fn, hdr, dlen, ...)                                                         \
	static void fn(void **state)                                                           \
	{                                                                                      \
		char *p = st_file(#fn, hdr, sizeof(hdr) - 1, dlen);                            \
		(void)state;                                                                   \
		expect_open_fail(p, -EINVAL, NEEDLES(__VA_ARGS__));                            \
		free(p);                                                                       \
	}

static struct moe_st_file *open_ok(const char *path)
{
	struct moe_st_file *f;
	char err[MOE_ERRLEN];

	if (moe_st_open(path, &f, err))
		fail_msg("%s", err);
	return f;
}

/* ------------------------------------------------------------------------
 * Round trip
 * ------------------------------------------------------------------------ */

static void test_roundtrip(void **state)
{
	static const char *const meta[] = {"format", "pt", "note", "ünïcode ok", NULL};
	float f32[6] = {1, -2, 3.5f, 4, 5, -6.25f};
	uint16_t bf16[4] = {0x3f80, 0x4000, 0xc040, 0x0000};
	int64_t i64[4] = {-1, 2, INT64_MAX, INT64_MIN};
	uint8_t scalar = 0x7e, f4[2] = {0x21, 0x43}, boolv[3] = {1, 0, 1};
	double f64[1] = {3.25};
	struct moe_st_wtensor w[] = {
		{"w.f32", MOE_ST_F32, 2, {2, 3}, f32},
		{"w.bf16", MOE_ST_BF16, 1, {4}, bf16},
		{"a.i64", MOE_ST_I64, 3, {1, 2, 2}, i64},
		{"scalar", MOE_ST_U8, 0, {0}, &scalar},
		{"empty", MOE_ST_F16, 2, {0, 5}, NULL},
		{"f4", MOE_ST_F4, 1, {4}, f4},
		{"mask", MOE_ST_BOOL, 1, {3}, boolv},
		{"z.f64", MOE_ST_F64, 1, {1}, f64},
	};
	const struct moe_st_tensor *t;
	struct moe_st_file *f;
	char err[MOE_ERRLEN], *path;
	unsigned char buf[64];

	(void)state;
	assert_true(asprintf(&path, "%s/roundtrip.safetensors", tmp) > 0);
	if (moe_st_write(path, w, sizeof(w) / sizeof(w[0]), meta, err))
		fail_msg("%s", err);
	f = open_ok(path);
	assert_int_equal(f->hdr.n_tensors, sizeof(w) / sizeof(w[0]));
	assert_int_equal(f->data_start % 8, 0);
	assert_string_equal(moe_st_meta(&f->hdr, "format"), "pt");
	assert_string_equal(moe_st_meta(&f->hdr, "note"), "ünïcode ok");
	assert_null(moe_st_meta(&f->hdr, "missing"));
	assert_null(moe_st_find(f, "w.f3"));
	assert_null(moe_st_find(f, "nope"));

	for (size_t i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
		uint64_t nb;

		t = moe_st_find(f, w[i].name);
		assert_non_null(t);
		assert_string_equal(t->name, w[i].name);
		assert_int_equal(t->dtype, w[i].dtype);
		assert_int_equal(t->ndim, w[i].ndim);
		for (uint32_t d = 0; d < t->ndim; d++)
			assert_int_equal(t->shape[d], w[i].shape[d]);
		nb = moe_st_numel(t) * moe_st_dtype_bits(t->dtype) / 8;
		assert_int_equal(t->end - t->begin, nb);
		assert_true(nb <= sizeof(buf));
		if (moe_st_pread(f, t, 0, nb, buf, err))
			fail_msg("%s", err);
		if (nb)
			assert_memory_equal(buf, w[i].data, nb);
	}
	/* a scalar has one element, a zero-size tensor none */
	assert_int_equal(moe_st_numel(moe_st_find(f, "scalar")), 1);
	assert_int_equal(moe_st_numel(moe_st_find(f, "empty")), 0);

	/* a slice: elements 2..4 of w.f32 */
	t = moe_st_find(f, "w.f32");
	if (moe_st_pread(f, t, 2 * sizeof(float), 3 * sizeof(float), buf, err))
		fail_msg("%s", err);
	assert_memory_equal(buf, &f32[2], 3 * sizeof(float));
	moe_st_close(f);
	free(path);
}

static void test_dtype_names(void **state)
{
	(void)state;
	for (int i = 0; i < MOE_ST_NDTYPES; i++) {
		assert_int_equal(moe_st_dtype_parse(moe_st_dtype_name(i)), i);
		assert_true(moe_st_dtype_bits(i) > 0);
	}
	assert_int_equal(moe_st_dtype_parse("f32"), -1);
	assert_int_equal(moe_st_dtype_parse(""), -1);
	assert_int_equal(moe_st_dtype_bits(MOE_ST_F4), 4);
	assert_int_equal(moe_st_dtype_bits(MOE_ST_F6_E2M3), 6);
	assert_string_equal(moe_st_dtype_name(MOE_ST_NDTYPES), "?");
}

/* The writer pads the header with spaces to a multiple of 8 whatever the
 * length of the JSON, so the data buffer starts 8-aligned. */
static void test_header_padding(void **state)
{
	static const char names[][12] = {"a", "ab", "abc", "abcd", "abcde", "abcdef",
					 "abcdefg", "abcdefgh"};
	char err[MOE_ERRLEN], *path;
	uint32_t v = 42;

	(void)state;
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		struct moe_st_wtensor w = {names[i], MOE_ST_U32, 1, {1}, &v};
		unsigned char raw[256];
		uint64_t n = 0;
		ssize_t got;
		int fd;

		assert_true(asprintf(&path, "%s/pad%zu.safetensors", tmp, i) > 0);
		if (moe_st_write(path, &w, 1, NULL, err))
			fail_msg("%s", err);
		fd = open(path, O_RDONLY);
		assert_true(fd >= 0);
		got = read(fd, raw, sizeof(raw));
		close(fd);
		for (int b = 7; b >= 0; b--)
			n = (n << 8) | raw[b];
		assert_int_equal(n % 8, 0);
		assert_int_equal(got, (ssize_t)(8 + n + 4));
		/* the JSON ends with '}', then only spaces */
		for (uint64_t k = n; raw[8 + k - 1] != '}'; k--)
			assert_int_equal(raw[8 + k - 1], ' ');
		moe_st_close(open_ok(path));
		free(path);
	}
}

static void test_leading_whitespace(void **state)
{
	static const char hdr[] =
		" \t\r\n{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}} \n ";
	struct moe_st_file *f;
	char *p = st_file("leading_ws", hdr, sizeof(hdr) - 1, 2);

	(void)state;
	f = open_ok(p);
	assert_int_equal(f->hdr.n_tensors, 1);
	assert_non_null(moe_st_find(f, "x"));
	moe_st_close(f);
	free(p);
}

static void test_empty_header(void **state)
{
	struct moe_st_file *f;
	char *p = st_file("empty_header", "{}", 2, 0);

	(void)state;
	f = open_ok(p);
	assert_int_equal(f->hdr.n_tensors, 0);
	moe_st_close(f);
	free(p);
}

/* ------------------------------------------------------------------------
 * Framing: the length prefix and the file size
 * ------------------------------------------------------------------------ */

static void test_file_too_short(void **state)
{
	char *p = tu_write_file(tmp, "short", "\x02\0\0\0\0", 5);

	(void)state;
	expect_open_fail(p, -EINVAL, NEEDLES("5 bytes", "too short"));
	free(p);
}

static void test_header_past_eof(void **state)
{
	static const char hdr[] = "{}      ";
	char *p = raw_file("past_eof", 64, hdr, sizeof(hdr) - 1);

	(void)state;
	expect_open_fail(p, -EINVAL, NEEDLES("header length 64", "past the end"));
	free(p);
}

static void test_header_huge(void **state)
{
	static const char hdr[] = "{}      ";
	char *p = raw_file("huge", 100000001ull, hdr, sizeof(hdr) - 1);

	(void)state;
	expect_open_fail(p, -EINVAL, NEEDLES("100000001", "exceeds the limit"));
	free(p);
	/* the top bit set must not wrap into a small length */
	p = raw_file("huge2", 1ull << 63, hdr, sizeof(hdr) - 1);
	expect_open_fail(p, -EINVAL, NEEDLES("exceeds the limit"));
	free(p);
}

static void test_not_a_regular_file(void **state)
{
	(void)state;
	expect_open_fail(tmp, -EINVAL, NEEDLES("not a regular file"));
}

static void test_missing_file(void **state)
{
	char *p;

	(void)state;
	assert_true(asprintf(&p, "%s/does-not-exist.safetensors", tmp) > 0);
	expect_open_fail(p, -ENOENT, NEEDLES("No such file"));
	free(p);
}

#define T_F32_2x3(b, e)                                                                            \
	"{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[" #b "," #e "]}}"

/* The data is 4 bytes shorter than the offsets say. */
BAD_HEADER(test_truncated_data, T_F32_2x3(0, 24), 20, "'t'", "truncated")
BAD_HEADER(test_trailing_bytes, T_F32_2x3(0, 24), 25, "trailing")
BAD_HEADER(test_trailing_bytes_no_tensor, "{}", 3, "trailing")

/* ------------------------------------------------------------------------
 * The header text
 * ------------------------------------------------------------------------ */

BAD_HEADER(test_header_not_brace, " \"t\":{}", 0, "does not start with '{'")
BAD_HEADER(test_header_empty, "        ", 0, "does not start with '{'")
BAD_HEADER(test_header_array, "[]", 0, "'{'")
BAD_HEADER(test_header_not_json, "{\"t\":{\"dtype\":", 0, "not valid JSON")
BAD_HEADER(test_header_bad_utf8, "{\"t\xff\":{}}", 0, "UTF-8")
BAD_HEADER(test_header_overlong_utf8, "{\"t\xc0\xaf\":{}}", 0, "UTF-8")
BAD_HEADER(test_header_surrogate_utf8, "{\"t\xed\xa0\x80\":{}}", 0, "UTF-8")
BAD_HEADER(test_header_cut_utf8, "{\"t\":{}}\xe2\x82", 0, "UTF-8")
BAD_HEADER(test_header_nul, "{\"t\0\":{}}", 0, "NUL")
BAD_HEADER(test_header_trailing_garbage, "{}  x", 0, "trailing bytes after the header")
BAD_HEADER(test_header_two_objects, "{}{}", 0, "trailing bytes after the header")

/* ------------------------------------------------------------------------
 * Offsets
 * ------------------------------------------------------------------------ */

BAD_HEADER(test_overlap,
	   "{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
	   "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[4,12]}}",
	   12, "'b'", "'a'", "overlap")
BAD_HEADER(test_same_offsets,
	   "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
	   "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
	   4, "overlap")
BAD_HEADER(test_hole,
	   "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
	   "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]}}",
	   12, "'b'", "hole")
BAD_HEADER(test_hole_at_start, "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
	   8, "'a'", "hole")
BAD_HEADER(test_size_mismatch, T_F32_2x3(0, 20), 20, "'t'", "24 bytes", "span 20")
BAD_HEADER(test_end_before_begin,
	   "{\"t\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4, "'t'",
	   "end 0 < begin 4")
BAD_HEADER(test_offsets_one_entry, "{\"t\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0]}}",
	   0, "'t'", "data_offsets")
BAD_HEADER(test_offsets_negative,
	   "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", 1, "'t'",
	   "data_offsets")
BAD_HEADER(test_offsets_string,
	   "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[\"0\",1]}}", 1, "'t'",
	   "data_offsets")

/* Tensors may be listed in any order in the JSON; only the offsets must
 * tile the buffer. */
static void test_any_order(void **state)
{
	static const char hdr[] = "{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]},"
				  "\"a\":{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[0,4]},"
				  "\"z\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[6,6]}}";
	struct moe_st_file *f;
	char *p = st_file("any_order", hdr, sizeof(hdr) - 1, 6);

	(void)state;
	f = open_ok(p);
	assert_int_equal(f->hdr.n_tensors, 3);
	assert_int_equal(moe_st_find(f, "b")->begin, 4);
	assert_int_equal(moe_st_find(f, "z")->end, 6);
	moe_st_close(f);
	free(p);
}

/* ------------------------------------------------------------------------
 * Tensor entries
 * ------------------------------------------------------------------------ */

BAD_HEADER(test_unknown_dtype, "{\"t\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}",
	   16, "'t'", "unknown dtype 'F128'")
BAD_HEADER(test_lowercase_dtype, "{\"t\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
	   4, "'t'", "unknown dtype")
BAD_HEADER(test_missing_dtype, "{\"t\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'t'", "dtype")
BAD_HEADER(test_dtype_not_string, "{\"t\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
	   "'t'", "dtype")
BAD_HEADER(test_missing_shape, "{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "'t'",
	   "shape")
BAD_HEADER(test_shape_not_array,
	   "{\"t\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}", 16, "'t'", "shape")
BAD_HEADER(test_missing_offsets, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "'t'",
	   "data_offsets")
BAD_HEADER(test_entry_not_object, "{\"t\":[1,2]}", 0, "'t'", "not an object")
BAD_HEADER(test_shape_negative,
	   "{\"t\":{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,24]}}", 24, "'t'",
	   "shape", "integers >= 0")
BAD_HEADER(test_shape_float, "{\"t\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}",
	   8, "'t'", "shape", "integers")
BAD_HEADER(test_shape_string,
	   "{\"t\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, "'t'",
	   "shape", "integers")
BAD_HEADER(test_shape_null, "{\"t\":{\"dtype\":\"F32\",\"shape\":[null],\"data_offsets\":[0,0]}}",
	   0, "'t'", "shape")
BAD_HEADER(test_too_many_dims,
	   "{\"t\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
	   "'t'", "9 dimensions", "at most 8")
/* 2^32 * 2^32 * 16 elements: the count itself overflows 64 bits. */
BAD_HEADER(test_shape_overflow,
	   "{\"t\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}",
	   0, "'t'", "too large")
/* 2^60 F64 elements fit in 64 bits, their 2^66 bits do not: a size check
 * done in bits must not wrap to "0 bytes" and accept [0, 0]. */
BAD_HEADER(test_shape_bits_overflow,
	   "{\"t\":{\"dtype\":\"F64\",\"shape\":[9007199254740992,128],\"data_offsets\":[0,0]}}",
	   0, "'t'")
BAD_HEADER(test_duplicate_names,
	   "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
	   "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
	   8, "'a'", "twice")
BAD_HEADER(test_f4_odd, "{\"t\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2, "'t'",
	   "3 elements of F4", "whole number of bytes")
BAD_HEADER(test_f6_partial, "{\"t\":{\"dtype\":\"F6_E2M3\",\"shape\":[3],\"data_offsets\":[0,3]}}",
	   3, "'t'", "whole number of bytes")

/* A zero in the shape makes any other dimension harmless. */
static void test_zero_dim_big_other(void **state)
{
	static const char hdr[] =
		"{\"t\":{\"dtype\":\"F64\",\"shape\":[0,9007199254740992,9007199254740992],"
		"\"data_offsets\":[0,0]}}";
	struct moe_st_file *f;
	char *p = st_file("zero_dim", hdr, sizeof(hdr) - 1, 0);

	(void)state;
	f = open_ok(p);
	assert_int_equal(moe_st_numel(moe_st_find(f, "t")), 0);
	moe_st_close(f);
	free(p);
}

/* F4 with an even count and F6 with a multiple of 4 are whole bytes. */
static void test_subbyte_ok(void **state)
{
	static const char hdr[] =
		"{\"a\":{\"dtype\":\"F4\",\"shape\":[2,3],\"data_offsets\":[0,3]},"
		"\"b\":{\"dtype\":\"F6_E3M2\",\"shape\":[4],\"data_offsets\":[3,6]}}";
	struct moe_st_file *f;
	char *p = st_file("subbyte", hdr, sizeof(hdr) - 1, 6);

	(void)state;
	f = open_ok(p);
	assert_int_equal(f->hdr.n_tensors, 2);
	moe_st_close(f);
	free(p);
}

/* ------------------------------------------------------------------------
 * __metadata__
 * ------------------------------------------------------------------------ */

BAD_HEADER(test_metadata_not_object, "{\"__metadata__\":\"pt\"}", 0, "__metadata__",
	   "not an object")
BAD_HEADER(test_metadata_array, "{\"__metadata__\":[\"a\",\"b\"]}", 0, "__metadata__",
	   "not an object")
BAD_HEADER(test_metadata_non_string, "{\"__metadata__\":{\"format\":\"pt\",\"n\":1}}", 0,
	   "__metadata__.n", "not a string")
BAD_HEADER(test_metadata_nested, "{\"__metadata__\":{\"o\":{}}}", 0, "__metadata__.o",
	   "not a string")
BAD_HEADER(test_metadata_twice, "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
	   "duplicate __metadata__")

/* moe_st_parse_header() directly, as the fuzz target drives it. */
static void test_parse_header_direct(void **state)
{
	static const char ok[] = "{\"__metadata__\":{\"k\":\"v\"},"
				 "\"w\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]}}";
	struct moe_st_header h;
	char err[MOE_ERRLEN];

	(void)state;
	if (moe_st_parse_header("mem", ok, sizeof(ok) - 1, 6, &h, err))
		fail_msg("%s", err);
	assert_int_equal(h.n_tensors, 1);
	assert_int_equal(h.n_meta, 1);
	assert_string_equal(moe_st_meta(&h, "k"), "v");
	moe_st_header_free(&h);
	/* the same header against a buffer of the wrong size */
	assert_int_equal(moe_st_parse_header("mem", ok, sizeof(ok) - 1, 7, &h, err), -EINVAL);
	assert_non_null(strstr(err, "mem: "));
	assert_int_equal(h.n_tensors, 0);
	assert_null(h.tensors);
	/* a header cut inside the JSON: `len` is the bound, not a NUL */
	assert_int_equal(moe_st_parse_header("mem", ok, 20, 6, &h, err), -EINVAL);
	assert_non_null(strstr(err, "not valid JSON"));
	assert_int_equal(moe_st_parse_header("mem", ok, 0, 0, &h, err), -EINVAL);
	/* a NULL message buffer is allowed */
	assert_int_equal(moe_st_parse_header("mem", "[", 1, 0, &h, NULL), -EINVAL);
}

/* ------------------------------------------------------------------------
 * Reads and identity
 * ------------------------------------------------------------------------ */

/* A two-tensor file; returns its path. */
static char *two_tensor_file(const char *name)
{
	static uint32_t a[16], b[8];
	struct moe_st_wtensor w[] = {
		{"a", MOE_ST_U32, 2, {4, 4}, a},
		{"b", MOE_ST_U32, 1, {8}, b},
	};
	char err[MOE_ERRLEN], *path;

	for (int i = 0; i < 16; i++)
		a[i] = 0x1000u + (uint32_t)i;
	for (int i = 0; i < 8; i++)
		b[i] = 0x2000u + (uint32_t)i;
	assert_true(asprintf(&path, "%s/%s", tmp, name) > 0);
	if (moe_st_write(path, w, 2, NULL, err))
		fail_msg("%s", err);
	return path;
}

static void test_pread_bounds(void **state)
{
	char *path = two_tensor_file("bounds.safetensors"), err[MOE_ERRLEN];
	struct moe_st_file *f = open_ok(path);
	const struct moe_st_tensor *t = moe_st_find(f, "b");
	uint32_t buf[16];

	(void)state;
	/* the whole tensor, and exactly up to its end */
	assert_int_equal(moe_st_pread(f, t, 0, 32, buf, err), 0);
	assert_int_equal(buf[7], 0x2007);
	assert_int_equal(moe_st_pread(f, t, 28, 4, buf, err), 0);
	assert_int_equal(buf[0], 0x2007);
	assert_int_equal(moe_st_pread(f, t, 32, 0, buf, err), 0);
	/* one byte past the end, an offset past the end, a wrapping length */
	assert_int_equal(moe_st_pread(f, t, 0, 33, buf, err), -ERANGE);
	assert_non_null(strstr(err, path));
	assert_non_null(strstr(err, "'b'"));
	assert_non_null(strstr(err, "outside the tensor"));
	assert_int_equal(moe_st_pread(f, t, 33, 0, buf, err), -ERANGE);
	assert_int_equal(moe_st_pread(f, t, 4, UINT64_MAX, buf, err), -ERANGE);
	assert_int_equal(moe_st_pread(f, t, UINT64_MAX, 2, buf, err), -ERANGE);
	moe_st_close(f);
	free(path);
}

static void expect_stale(const struct moe_st_file *f, const char *needle)
{
	char err[MOE_ERRLEN] = "";
	int ret = moe_st_check_identity(f, err);

	if (ret != -ESTALE)
		fail_msg("check_identity returned %d, expected -ESTALE (%s)", ret, err);
	if (!strstr(err, f->path) || !strstr(err, needle))
		fail_msg("message lacks the path or \"%s\": %s", needle, err);
}

static void set_old_mtime(const char *path)
{
	struct timespec ts[2] = {{978307200, 0}, {978307200, 0}}; /* 2001-01-01 */

	assert_int_equal(utimensat(AT_FDCWD, path, ts, 0), 0);
}

/* Data rewritten in place: the size and header stay, the mtime moves. The
 * file starts with an old mtime so that the write's (coarse) timestamp
 * surely differs. */
static void test_identity_data_modified(void **state)
{
	char *path = two_tensor_file("ident_data.safetensors"), err[MOE_ERRLEN];
	struct moe_st_file *f;
	uint32_t junk = 0xdeadbeef;
	int fd;

	(void)state;
	set_old_mtime(path);
	f = open_ok(path);
	assert_int_equal(moe_st_check_identity(f, err), 0);
	assert_int_equal(moe_st_check_identity(f, err), 0);
	fd = open(path, O_WRONLY);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, &junk, 4, (off_t)(f->data_start + 8)), 4);
	close(fd);
	expect_stale(f, "modified");
	moe_st_close(f);
	free(path);
}

/* A header byte rewritten in place: caught by the header hash even if the
 * filesystem gave the write the same mtime. */
static void test_identity_header_modified(void **state)
{
	char *path = two_tensor_file("ident_hdr.safetensors"), err[MOE_ERRLEN];
	struct moe_st_file *f;
	struct timespec keep[2];
	struct stat st;
	int fd;

	(void)state;
	f = open_ok(path);
	assert_int_equal(moe_st_check_identity(f, err), 0);
	assert_int_equal(stat(path, &st), 0);
	fd = open(path, O_WRONLY);
	assert_true(fd >= 0);
	/* byte 9 is the '"' opening the first name: make it '\'' */
	assert_int_equal(pwrite(fd, "'", 1, 9), 1);
	/* and put the old mtime back, as a careful copier would */
	keep[0] = st.st_atim;
	keep[1] = st.st_mtim;
	assert_int_equal(futimens(fd, keep), 0);
	close(fd);
	expect_stale(f, "header changed");
	moe_st_close(f);
	free(path);
}

static void test_identity_truncated(void **state)
{
	char *path = two_tensor_file("ident_trunc.safetensors"), err[MOE_ERRLEN];
	const struct moe_st_tensor *t;
	struct moe_st_file *f;
	uint32_t buf[8];

	(void)state;
	f = open_ok(path);
	assert_int_equal(truncate(path, (off_t)(f->id.size - 4)), 0);
	expect_stale(f, "changed size");
	/* the last tensor now ends past EOF: a read says so */
	t = moe_st_find(f, "b");
	if (t->begin < moe_st_find(f, "a")->begin)
		t = moe_st_find(f, "a");
	assert_int_equal(moe_st_pread(f, t, 0, t->end - t->begin, buf, err), -EIO);
	assert_non_null(strstr(err, path));
	assert_non_null(strstr(err, "truncated"));
	moe_st_close(f);
	free(path);
}

/* Reopening the rewritten file gives a new, consistent identity. */
static void test_identity_stable(void **state)
{
	char *path = two_tensor_file("ident_stable.safetensors"), err[MOE_ERRLEN];
	struct moe_st_file *f = open_ok(path), *g = open_ok(path);

	(void)state;
	assert_memory_equal(&f->id, &g->id, sizeof(f->id));
	assert_int_equal(moe_st_check_identity(g, err), 0);
	moe_st_close(f);
	moe_st_close(g);
	free(path);
}

static void test_hash(void **state)
{
	(void)state;
	/* FNV-1a 64 test vectors */
	assert_int_equal(moe_st_hash("", 0, 0), 0xcbf29ce484222325ull);
	assert_int_equal(moe_st_hash("a", 1, 0), 0xaf63dc4c8601ec8cull);
	assert_int_equal(moe_st_hash("foobar", 6, 0), 0x85944171f73967e8ull);
	/* chaining equals hashing the concatenation */
	assert_int_equal(moe_st_hash("bar", 3, moe_st_hash("foo", 3, 0)),
			 moe_st_hash("foobar", 6, 0));
}

static void test_write_errors(void **state)
{
	struct moe_st_wtensor w = {"x", MOE_ST_U8, 1, {1}, "x"};
	char err[MOE_ERRLEN], *path;

	(void)state;
	assert_true(asprintf(&path, "%s/no/such/dir/x.safetensors", tmp) > 0);
	assert_int_equal(moe_st_write(path, &w, 1, NULL, err), -ENOENT);
	assert_non_null(strstr(err, path));
	free(path);
}

#define T(fn) cmocka_unit_test(fn)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_roundtrip),
		T(test_dtype_names),
		T(test_header_padding),
		T(test_leading_whitespace),
		T(test_empty_header),
		T(test_file_too_short),
		T(test_header_past_eof),
		T(test_header_huge),
		T(test_not_a_regular_file),
		T(test_missing_file),
		T(test_truncated_data),
		T(test_trailing_bytes),
		T(test_trailing_bytes_no_tensor),
		T(test_header_not_brace),
		T(test_header_empty),
		T(test_header_array),
		T(test_header_not_json),
		T(test_header_bad_utf8),
		T(test_header_overlong_utf8),
		T(test_header_surrogate_utf8),
		T(test_header_cut_utf8),
		T(test_header_nul),
		T(test_header_trailing_garbage),
		T(test_header_two_objects),
		T(test_overlap),
		T(test_same_offsets),
		T(test_hole),
		T(test_hole_at_start),
		T(test_size_mismatch),
		T(test_end_before_begin),
		T(test_offsets_one_entry),
		T(test_offsets_negative),
		T(test_offsets_string),
		T(test_any_order),
		T(test_unknown_dtype),
		T(test_lowercase_dtype),
		T(test_missing_dtype),
		T(test_dtype_not_string),
		T(test_missing_shape),
		T(test_shape_not_array),
		T(test_missing_offsets),
		T(test_entry_not_object),
		T(test_shape_negative),
		T(test_shape_float),
		T(test_shape_string),
		T(test_shape_null),
		T(test_too_many_dims),
		T(test_shape_overflow),
		T(test_shape_bits_overflow),
		T(test_duplicate_names),
		T(test_f4_odd),
		T(test_f6_partial),
		T(test_zero_dim_big_other),
		T(test_subbyte_ok),
		T(test_metadata_not_object),
		T(test_metadata_array),
		T(test_metadata_non_string),
		T(test_metadata_nested),
		T(test_metadata_twice),
		T(test_parse_header_direct),
		T(test_pread_bounds),
		T(test_identity_data_modified),
		T(test_identity_header_modified),
		T(test_identity_truncated),
		T(test_identity_stable),
		T(test_hash),
		T(test_write_errors),
	};

	return cmocka_run_group_tests_name("safetensors", tests, group_setup, group_teardown);
}
