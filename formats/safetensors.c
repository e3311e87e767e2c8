#include "formats/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct {
	const char *name;
	unsigned bits;
} dtypes[MOE_ST_NDTYPES] = {
	[MOE_ST_BOOL] = {"BOOL", 8},
	[MOE_ST_U8] = {"U8", 8},
	[MOE_ST_I8] = {"I8", 8},
	[MOE_ST_I16] = {"I16", 16},
	[MOE_ST_U16] = {"U16", 16},
	[MOE_ST_F16] = {"F16", 16},
	[MOE_ST_BF16] = {"BF16", 16},
	[MOE_ST_I32] = {"I32", 32},
	[MOE_ST_U32] = {"U32", 32},
	[MOE_ST_F32] = {"F32", 32},
	[MOE_ST_I64] = {"I64", 64},
	[MOE_ST_U64] = {"U64", 64},
	[MOE_ST_F64] = {"F64", 64},
	[MOE_ST_C64] = {"C64", 64},
	[MOE_ST_F8_E5M2] = {"F8_E5M2", 8},
	[MOE_ST_F8_E4M3] = {"F8_E4M3", 8},
	[MOE_ST_F8_E8M0] = {"F8_E8M0", 8},
	[MOE_ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
	[MOE_ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
	[MOE_ST_F4] = {"F4", 4},
	[MOE_ST_F6_E2M3] = {"F6_E2M3", 6},
	[MOE_ST_F6_E3M2] = {"F6_E3M2", 6},
};

const char *moe_st_dtype_name(enum moe_st_dtype dt)
{
	return (unsigned)dt < MOE_ST_NDTYPES ? dtypes[dt].name : "?";
}

int moe_st_float_code(enum moe_st_dtype dt)
{
	return dt == MOE_ST_F32 ? 0 : dt == MOE_ST_BF16 ? 1 : dt == MOE_ST_F16 ? 2 : -1;
}

unsigned moe_st_dtype_bits(enum moe_st_dtype dt)
{
	return (unsigned)dt < MOE_ST_NDTYPES ? dtypes[dt].bits : 0;
}

int moe_st_dtype_parse(const char *s)
{
	for (int i = 0; i < MOE_ST_NDTYPES; i++)
		if (strcmp(s, dtypes[i].name) == 0)
			return i;
	return -1;
}

uint64_t moe_st_hash(const void *p, size_t n, uint64_t h)
{
	const unsigned char *c = p;

	if (!h)
		h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= c[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

uint64_t moe_st_numel(const struct moe_st_tensor *t)
{
	uint64_t n = 1;

	for (uint32_t i = 0; i < t->ndim; i++)
		n *= t->shape[i]; /* validated not to overflow at parse time */
	return n;
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
static bool utf8_valid(const unsigned char *s, size_t n)
{
	size_t i = 0;

	while (i < n) {
		unsigned c = s[i], len, min;
		uint32_t cp;

		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xe0) == 0xc0) {
			len = 2, min = 0x80, cp = c & 0x1f;
		} else if ((c & 0xf0) == 0xe0) {
			len = 3, min = 0x800, cp = c & 0x0f;
		} else if ((c & 0xf8) == 0xf0) {
			len = 4, min = 0x10000, cp = c & 0x07;
		} else {
			return false;
		}
		if (n - i < len)
			return false;
		for (unsigned k = 1; k < len; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return false;
			cp = (cp << 6) | (s[i + k] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += len;
	}
	return true;
}

static bool is_ws(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* A JSON number that is a non-negative integer exactly representable. */
static int json_u64(const cJSON *v, uint64_t *out)
{
	double d;

	if (!cJSON_IsNumber(v))
		return -1;
	d = v->valuedouble;
	if (!(d >= 0) || d > 9007199254740992.0 || floor(d) != d)
		return -1;
	*out = (uint64_t)d;
	return 0;
}

void moe_st_header_free(struct moe_st_header *h)
{
	if (!h)
		return;
	for (uint32_t i = 0; i < h->n_tensors; i++)
		free(h->tensors[i].name);
	for (uint32_t i = 0; i < h->n_meta; i++) {
		free(h->meta_keys[i]);
		free(h->meta_vals[i]);
	}
	free(h->tensors);
	free(h->meta_keys);
	free(h->meta_vals);
	memset(h, 0, sizeof(*h));
}

const char *moe_st_meta(const struct moe_st_header *h, const char *key)
{
	for (uint32_t i = 0; i < h->n_meta; i++)
		if (strcmp(h->meta_keys[i], key) == 0)
			return h->meta_vals[i];
	return NULL;
}

static int parse_metadata(const char *what, const cJSON *m, struct moe_st_header *h, char *err)
{
	int n = cJSON_GetArraySize(m);
	const cJSON *kv;

	if (!cJSON_IsObject(m))
		return moe_err(err, -EINVAL, "%s: __metadata__ is not an object", what);
	h->meta_keys = calloc(n ? n : 1, sizeof(char *));
	h->meta_vals = calloc(n ? n : 1, sizeof(char *));
	if (!h->meta_keys || !h->meta_vals)
		return moe_err(err, -ENOMEM, "%s: out of memory", what);
	cJSON_ArrayForEach(kv, m)
	{
		if (!cJSON_IsString(kv))
			return moe_err(err, -EINVAL, "%s: __metadata__.%s is not a string", what,
				       kv->string);
		h->meta_keys[h->n_meta] = strdup(kv->string);
		h->meta_vals[h->n_meta] = strdup(kv->valuestring);
		h->n_meta++;
		if (!h->meta_keys[h->n_meta - 1] || !h->meta_vals[h->n_meta - 1])
			return moe_err(err, -ENOMEM, "%s: out of memory", what);
	}
	return 0;
}

static int parse_tensor(const char *what, const cJSON *e, struct moe_st_tensor *t, char *err)
{
	const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
	const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
	const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
	const cJSON *d;
	uint64_t numel = 1, bits, nbytes;
	int code;

	if (!cJSON_IsObject(e))
		return moe_err(err, -EINVAL, "%s: tensor '%s': entry is not an object", what,
			       t->name);
	if (!cJSON_IsString(dt))
		return moe_err(err, -EINVAL, "%s: tensor '%s': missing or non-string dtype", what,
			       t->name);
	code = moe_st_dtype_parse(dt->valuestring);
	if (code < 0)
		return moe_err(err, -EINVAL, "%s: tensor '%s': unknown dtype '%s'", what, t->name,
			       dt->valuestring);
	t->dtype = code;
	if (!cJSON_IsArray(shape))
		return moe_err(err, -EINVAL, "%s: tensor '%s': missing or non-array shape", what,
			       t->name);
	if (cJSON_GetArraySize(shape) > MOE_ST_MAX_DIMS)
		return moe_err(err, -EINVAL, "%s: tensor '%s': %d dimensions (at most %d)", what,
			       t->name, cJSON_GetArraySize(shape), MOE_ST_MAX_DIMS);
	cJSON_ArrayForEach(d, shape)
	{
		uint64_t v;

		if (json_u64(d, &v))
			return moe_err(err, -EINVAL,
				       "%s: tensor '%s': shape entries must be integers >= 0", what,
				       t->name);
		/* numel * bits (up to 64 per element) must not wrap either */
		if (v && numel > UINT64_MAX / 64 / v)
			return moe_err(err, -EINVAL, "%s: tensor '%s': shape is too large", what,
				       t->name);
		numel *= v;
		t->shape[t->ndim++] = v;
	}
	if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
	    json_u64(cJSON_GetArrayItem(offs, 0), &t->begin) ||
	    json_u64(cJSON_GetArrayItem(offs, 1), &t->end))
		return moe_err(err, -EINVAL,
			       "%s: tensor '%s': data_offsets must be [begin, end] integers", what,
			       t->name);
	if (t->end < t->begin)
		return moe_err(err, -EINVAL, "%s: tensor '%s': data_offsets end %llu < begin %llu",
			       what, t->name, (unsigned long long)t->end,
			       (unsigned long long)t->begin);
	bits = numel * moe_st_dtype_bits(t->dtype);
	if (bits % 8)
		return moe_err(err, -EINVAL,
			       "%s: tensor '%s': %llu elements of %s is not a whole number of bytes",
			       what, t->name, (unsigned long long)numel, dt->valuestring);
	nbytes = bits / 8;
	if (t->end - t->begin != nbytes)
		return moe_err(err, -EINVAL,
			       "%s: tensor '%s': shape and dtype %s need %llu bytes but "
			       "data_offsets span %llu",
			       what, t->name, dt->valuestring, (unsigned long long)nbytes,
			       (unsigned long long)(t->end - t->begin));
	return 0;
}

static int cmp_by_offset(const void *a, const void *b)
{
	const struct moe_st_tensor *x = *(const struct moe_st_tensor *const *)a;
	const struct moe_st_tensor *y = *(const struct moe_st_tensor *const *)b;

	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	if (x->end != y->end)
		return x->end < y->end ? -1 : 1;
	return 0;
}

static int cmp_by_name(const void *a, const void *b)
{
	return strcmp(((const struct moe_st_tensor *)a)->name,
		      ((const struct moe_st_tensor *)b)->name);
}

/* Offsets must tile [0, data_len) exactly: sorted by begin, each tensor
 * starts where the previous one ended. */
static int check_tiling(const char *what, struct moe_st_header *h, uint64_t data_len, char *err)
{
	struct moe_st_tensor **v;
	uint64_t pos = 0;
	int ret = 0;

	v = malloc((h->n_tensors ? h->n_tensors : 1) * sizeof(*v));
	if (!v)
		return moe_err(err, -ENOMEM, "%s: out of memory", what);
	for (uint32_t i = 0; i < h->n_tensors; i++)
		v[i] = &h->tensors[i];
	qsort(v, h->n_tensors, sizeof(*v), cmp_by_offset);
	for (uint32_t i = 0; i < h->n_tensors; i++) {
		if (v[i]->begin < pos) {
			ret = moe_err(err, -EINVAL,
				      "%s: tensor '%s': data_offsets [%llu, %llu] overlap the "
				      "previous tensor '%s' (ends at %llu)",
				      what, v[i]->name, (unsigned long long)v[i]->begin,
				      (unsigned long long)v[i]->end, v[i - 1]->name,
				      (unsigned long long)pos);
			goto out;
		}
		if (v[i]->begin > pos) {
			ret = moe_err(err, -EINVAL,
				      "%s: tensor '%s': hole in the data buffer before offset %llu "
				      "(previous data ends at %llu)",
				      what, v[i]->name, (unsigned long long)v[i]->begin,
				      (unsigned long long)pos);
			goto out;
		}
		pos = v[i]->end;
	}
	if (pos > data_len)
		ret = moe_err(err, -EINVAL,
			      "%s: tensor '%s': data_offsets end %llu is past the end of the "
			      "%llu-byte data buffer (file truncated?)",
			      what, v[h->n_tensors - 1]->name, (unsigned long long)pos,
			      (unsigned long long)data_len);
	else if (pos < data_len)
		ret = moe_err(err, -EINVAL,
			      "%s: %llu trailing bytes after the last tensor (data buffer is "
			      "%llu bytes, the tensors cover %llu)",
			      what, (unsigned long long)(data_len - pos),
			      (unsigned long long)data_len, (unsigned long long)pos);
out:
	free(v);
	return ret;
}

int moe_st_parse_header(const char *what, const char *json, size_t len, uint64_t data_len,
			struct moe_st_header *h, char *err)
{
	const char *end = NULL;
	cJSON *root, *e;
	size_t i = 0;
	int n, ret;

	memset(h, 0, sizeof(*h));
	while (i < len && is_ws(json[i]))
		i++;
	if (i == len || json[i] != '{')
		return moe_err(err, -EINVAL, "%s: header does not start with '{'", what);
	if (!utf8_valid((const unsigned char *)json, len))
		return moe_err(err, -EINVAL, "%s: header is not valid UTF-8", what);
	if (memchr(json, '\0', len))
		return moe_err(err, -EINVAL, "%s: header contains a NUL byte", what);
	root = cJSON_ParseWithLengthOpts(json, len, &end, false);
	if (!root) {
		const char *at = cJSON_GetErrorPtr();
		size_t off = at && at >= json && at <= json + len ? (size_t)(at - json) : 0;

		return moe_err(err, -EINVAL, "%s: header is not valid JSON (near byte %zu)", what,
			       off);
	}
	for (const char *p = end; p && p < json + len; p++) {
		if (!is_ws(*p)) {
			ret = moe_err(err, -EINVAL, "%s: trailing bytes after the header JSON",
				      what);
			goto out;
		}
	}
	if (!cJSON_IsObject(root)) {
		ret = moe_err(err, -EINVAL, "%s: header is not a JSON object", what);
		goto out;
	}
	n = cJSON_GetArraySize(root);
	h->tensors = calloc(n ? n : 1, sizeof(*h->tensors));
	if (!h->tensors) {
		ret = moe_err(err, -ENOMEM, "%s: out of memory", what);
		goto out;
	}
	cJSON_ArrayForEach(e, root)
	{
		struct moe_st_tensor *t;

		if (strcmp(e->string, "__metadata__") == 0) {
			if (h->meta_keys) {
				ret = moe_err(err, -EINVAL, "%s: duplicate __metadata__", what);
				goto out;
			}
			ret = parse_metadata(what, e, h, err);
			if (ret)
				goto out;
			continue;
		}
		t = &h->tensors[h->n_tensors++];
		t->name = strdup(e->string);
		if (!t->name) {
			ret = moe_err(err, -ENOMEM, "%s: out of memory", what);
			goto out;
		}
		ret = parse_tensor(what, e, t, err);
		if (ret)
			goto out;
	}
	qsort(h->tensors, h->n_tensors, sizeof(*h->tensors), cmp_by_name);
	for (uint32_t k = 1; k < h->n_tensors; k++) {
		if (strcmp(h->tensors[k - 1].name, h->tensors[k].name) == 0) {
			ret = moe_err(err, -EINVAL, "%s: tensor '%s' appears twice in the header",
				      what, h->tensors[k].name);
			goto out;
		}
	}
	ret = check_tiling(what, h, data_len, err);
out:
	cJSON_Delete(root);
	if (ret)
		moe_st_header_free(h);
	return ret;
}

/* ------------------------------------------------------------------------ */

static int pread_full(int fd, void *dst, uint64_t len, uint64_t off)
{
	char *p = dst;

	while (len) {
		size_t chunk = len > (1u << 30) ? (1u << 30) : (size_t)len;
		ssize_t r = pread(fd, p, chunk, (off_t)off);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -ENODATA;
		p += r, off += (uint64_t)r, len -= (uint64_t)r;
	}
	return 0;
}

static void identity_from_stat(const struct stat *st, struct moe_st_identity *id)
{
	id->dev = st->st_dev;
	id->ino = st->st_ino;
	id->size = (uint64_t)st->st_size;
	id->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
}

int moe_st_open(const char *path, struct moe_st_file **out, char *err)
{
	struct moe_st_file *f;
	unsigned char lenbuf[8];
	uint64_t n = 0;
	struct stat st;
	char *json = NULL;
	int ret;

	f = calloc(1, sizeof(*f));
	if (!f)
		return moe_err(err, -ENOMEM, "%s: out of memory", path);
	f->fd = -1;
	f->path = strdup(path);
	if (!f->path) {
		ret = moe_err(err, -ENOMEM, "%s: out of memory", path);
		goto err_free;
	}
	f->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (f->fd < 0) {
		ret = moe_err(err, -errno, "%s: %s", path, strerror(errno));
		goto err_free;
	}
	if (fstat(f->fd, &st) < 0) {
		ret = moe_err(err, -errno, "%s: fstat: %s", path, strerror(errno));
		goto err_free;
	}
	if (!S_ISREG(st.st_mode)) {
		ret = moe_err(err, -EINVAL, "%s: not a regular file", path);
		goto err_free;
	}
	identity_from_stat(&st, &f->id);
	if (f->id.size < 8) {
		ret = moe_err(err, -EINVAL, "%s: file is %llu bytes, too short for a header", path,
			      (unsigned long long)f->id.size);
		goto err_free;
	}
	ret = pread_full(f->fd, lenbuf, 8, 0);
	if (ret) {
		ret = moe_err(err, ret, "%s: reading the header length: %s", path,
			      ret == -ENODATA ? "file truncated" : strerror(-ret));
		goto err_free;
	}
	for (int i = 7; i >= 0; i--)
		n = (n << 8) | lenbuf[i];
	if (n > MOE_ST_MAX_HEADER) {
		ret = moe_err(err, -EINVAL, "%s: header length %llu exceeds the limit of %llu", path,
			      (unsigned long long)n, MOE_ST_MAX_HEADER);
		goto err_free;
	}
	if (n > f->id.size - 8) {
		ret = moe_err(err, -EINVAL,
			      "%s: header length %llu runs past the end of the file (%llu bytes)",
			      path, (unsigned long long)n, (unsigned long long)f->id.size);
		goto err_free;
	}
	json = malloc(n ? n : 1);
	if (!json) {
		ret = moe_err(err, -ENOMEM, "%s: out of memory for a %llu-byte header", path,
			      (unsigned long long)n);
		goto err_free;
	}
	ret = pread_full(f->fd, json, n, 8);
	if (ret) {
		ret = moe_err(err, ret, "%s: reading the header: %s", path,
			      ret == -ENODATA ? "file truncated" : strerror(-ret));
		goto err_free;
	}
	f->header_len = n;
	f->data_start = 8 + n;
	ret = moe_st_parse_header(path, json, n, f->id.size - 8 - n, &f->hdr, err);
	if (ret)
		goto err_free;
	f->id.header_hash = moe_st_hash(json, n, moe_st_hash(lenbuf, 8, 0));
	free(json);
	*out = f;
	return 0;

err_free:
	free(json);
	moe_st_close(f);
	return ret;
}

void moe_st_close(struct moe_st_file *f)
{
	if (!f)
		return;
	if (f->fd >= 0)
		close(f->fd);
	moe_st_header_free(&f->hdr);
	free(f->path);
	free(f);
}

const struct moe_st_tensor *moe_st_find(const struct moe_st_file *f, const char *name)
{
	struct moe_st_tensor key = {.name = (char *)name};

	return bsearch(&key, f->hdr.tensors, f->hdr.n_tensors, sizeof(key), cmp_by_name);
}

int moe_st_pread(const struct moe_st_file *f, const struct moe_st_tensor *t, uint64_t off,
		 uint64_t len, void *dst, char *err)
{
	int ret;

	if (off > t->end - t->begin || len > t->end - t->begin - off)
		return moe_err(err, -ERANGE, "%s: tensor '%s': read of %llu bytes at %llu is "
			       "outside the tensor",
			       f->path, t->name, (unsigned long long)len, (unsigned long long)off);
	ret = pread_full(f->fd, dst, len, f->data_start + t->begin + off);
	if (ret == -ENODATA)
		return moe_err(err, -EIO, "%s: tensor '%s': file was truncated while reading",
			       f->path, t->name);
	if (ret)
		return moe_err(err, ret, "%s: tensor '%s': read: %s", f->path, t->name,
			       strerror(-ret));
	return 0;
}

int moe_st_check_identity(const struct moe_st_file *f, char *err)
{
	struct moe_st_identity now;
	unsigned char lenbuf[8];
	struct stat st;
	char *json;
	int ret;

	if (fstat(f->fd, &st) < 0)
		return moe_err(err, -errno, "%s: fstat: %s", f->path, strerror(errno));
	identity_from_stat(&st, &now);
	if (now.dev != f->id.dev || now.ino != f->id.ino)
		return moe_err(err, -ESTALE, "%s: file was replaced while loading", f->path);
	if (now.size != f->id.size)
		return moe_err(err, -ESTALE,
			       "%s: file changed size while loading (%llu -> %llu bytes)", f->path,
			       (unsigned long long)f->id.size, (unsigned long long)now.size);
	if (now.mtime_ns != f->id.mtime_ns)
		return moe_err(err, -ESTALE, "%s: file was modified while loading (mtime changed)",
			       f->path);
	json = malloc(f->header_len ? f->header_len : 1);
	if (!json)
		return moe_err(err, -ENOMEM, "%s: out of memory", f->path);
	ret = pread_full(f->fd, lenbuf, 8, 0);
	if (!ret)
		ret = pread_full(f->fd, json, f->header_len, 8);
	if (!ret && moe_st_hash(json, f->header_len, moe_st_hash(lenbuf, 8, 0)) !=
			    f->id.header_hash)
		ret = -ESTALE;
	free(json);
	if (ret)
		return moe_err(err, ret == -ESTALE ? -ESTALE : -EIO,
			       "%s: header changed while loading", f->path);
	return 0;
}

/* ------------------------------------------------------------------------ */

static int write_full(int fd, const void *p, uint64_t len)
{
	const char *c = p;

	while (len) {
		size_t chunk = len > (1u << 30) ? (1u << 30) : (size_t)len;
		ssize_t w = write(fd, c, chunk);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		c += w, len -= (uint64_t)w;
	}
	return 0;
}

static uint64_t wtensor_bytes(const struct moe_st_wtensor *t)
{
	uint64_t n = 1;

	for (uint32_t d = 0; d < t->ndim; d++)
		n *= t->shape[d];
	return n * moe_st_dtype_bits(t->dtype) / 8;
}

static char *build_header(const struct moe_st_wtensor *t, size_t n, const char *const *meta)
{
	cJSON *root = cJSON_CreateObject();
	uint64_t off = 0;
	char *s = NULL;

	if (!root)
		return NULL;
	if (meta && meta[0]) {
		cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");

		for (size_t i = 0; m && meta[i] && meta[i + 1]; i += 2)
			cJSON_AddStringToObject(m, meta[i], meta[i + 1]);
	}
	for (size_t i = 0; i < n; i++) {
		cJSON *e = cJSON_AddObjectToObject(root, t[i].name);
		cJSON *shape, *offs;
		uint64_t nb = wtensor_bytes(&t[i]);

		if (!e)
			goto out;
		cJSON_AddStringToObject(e, "dtype", moe_st_dtype_name(t[i].dtype));
		shape = cJSON_AddArrayToObject(e, "shape");
		for (uint32_t d = 0; shape && d < t[i].ndim; d++)
			cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t[i].shape[d]));
		offs = cJSON_AddArrayToObject(e, "data_offsets");
		if (offs) {
			cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
			cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + nb)));
		}
		off += nb;
	}
	s = cJSON_PrintUnformatted(root);
out:
	cJSON_Delete(root);
	return s;
}

int moe_st_write(const char *path, const struct moe_st_wtensor *t, size_t n,
		 const char *const *meta, char *err)
{
	unsigned char lenbuf[8];
	char *hdr;
	size_t hlen, padded;
	int fd, ret;

	hdr = build_header(t, n, meta);
	if (!hdr)
		return moe_err(err, -ENOMEM, "%s: out of memory building the header", path);
	hlen = strlen(hdr);
	padded = (hlen + 7) & ~(size_t)7;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		ret = moe_err(err, -errno, "%s: %s", path, strerror(errno));
		goto out_free;
	}
	for (int i = 0; i < 8; i++)
		lenbuf[i] = (unsigned char)((uint64_t)padded >> (8 * i));
	ret = write_full(fd, lenbuf, 8);
	if (!ret)
		ret = write_full(fd, hdr, hlen);
	for (size_t i = hlen; !ret && i < padded; i++)
		ret = write_full(fd, " ", 1);
	for (size_t i = 0; !ret && i < n; i++)
		ret = write_full(fd, t[i].data, wtensor_bytes(&t[i]));
	if (ret)
		moe_err(err, ret, "%s: write: %s", path, strerror(-ret));
	if (close(fd) < 0 && !ret)
		ret = moe_err(err, -errno, "%s: close: %s", path, strerror(errno));
out_free:
	free(hdr);
	return ret;
}
