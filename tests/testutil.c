#include "tests/testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/engine/checkpoint.h"
#include "daemon/engine/log.h"

char *tu_tmpdir(void)
{
	char tmpl[] = "/tmp/moe-test-XXXXXX";
	char *d = mkdtemp(tmpl);

	assert_non_null(d);
	return strdup(d);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

void tu_rmtree(const char *dir)
{
	nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *tu_write_file(const char *dir, const char *name, const void *p, size_t len)
{
	char *path;
	FILE *f;

	assert_true(asprintf(&path, "%s/%s", dir, name) > 0);
	f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(p, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
	return path;
}

void tu_to_f64(enum moe_dtype dt, const void *src, double *dst, size_t n)
{
	const uint16_t *h = src;
	const float *f = src;

	for (size_t i = 0; i < n; i++)
		dst[i] = dt == MOE_DT_F32	 ? f[i]
			 : dt == MOE_DT_BF16 ? moe_bf16_to_f32(h[i])
					     : moe_f16_to_f32(h[i]);
}

double *tu_read_f64(const struct moe_st_file *f, const char *name, size_t *n)
{
	const struct moe_st_tensor *t = moe_st_find(f, name);
	char err[MOE_ERRLEN];
	size_t bytes, cnt;
	double *out;
	void *raw;

	if (!t)
		fail_msg("%s: no tensor %s", f->path, name);
	cnt = moe_st_numel(t);
	bytes = t->end - t->begin;
	raw = malloc(bytes + 1);
	out = malloc(cnt * sizeof(double) + 1);
	assert_non_null(raw);
	assert_non_null(out);
	if (moe_st_pread(f, t, 0, bytes, raw, err))
		fail_msg("%s", err);
	for (size_t i = 0; i < cnt; i++) {
		switch (t->dtype) {
		case MOE_ST_F64:
			out[i] = ((const double *)raw)[i];
			break;
		case MOE_ST_F32:
			out[i] = ((const float *)raw)[i];
			break;
		case MOE_ST_I32:
			out[i] = ((const int32_t *)raw)[i];
			break;
		case MOE_ST_BF16:
			out[i] = moe_bf16_to_f32(((const uint16_t *)raw)[i]);
			break;
		case MOE_ST_F16:
			out[i] = moe_f16_to_f32(((const uint16_t *)raw)[i]);
			break;
		default:
			fail_msg("%s: unexpected dtype", name);
		}
	}
	free(raw);
	*n = cnt;
	return out;
}

double tu_check_rows(const char *what, const double *y, const double *ref, size_t rows,
		     size_t cols, double atol, double rtol)
{
	double worst = 0;
	size_t wr = 0, wc = 0;

	for (size_t r = 0; r < rows; r++) {
		double ss = 0, rms;

		for (size_t c = 0; c < cols; c++)
			ss += ref[r * cols + c] * ref[r * cols + c];
		rms = sqrt(ss / (double)cols);
		for (size_t c = 0; c < cols; c++) {
			double d = fabs(y[r * cols + c] - ref[r * cols + c]);
			double tol = atol * rms + rtol * fabs(ref[r * cols + c]);
			double q = tol > 0 ? d / tol : (d > 0 ? INFINITY : 0);

			if (!(q <= worst)) { /* NaN counts as worst */
				worst = isnan(q) ? INFINITY : q;
				wr = r, wc = c;
			}
		}
	}
	if (worst > 1)
		print_message("%s: worst at [%zu,%zu]: got %.9g, want %.9g (%.2fx the tolerance)\n",
			      what, wr, wc, y[wr * cols + wc], ref[wr * cols + wc], worst);
	return worst;
}

unsigned tu_ncpu(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n > 0 ? (unsigned)n : 1;
}

void tu_copy_dir(const char *from, const char *to)
{
	char cmd[2048];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s' && cp -r '%s' '%s'", to, from, to);
	assert_int_equal(system(cmd), 0);
}

void tu_poke_tensor(const char *ckpt_dir, const char *tensor, uint64_t off, const void *p,
		    size_t n)
{
	char err[MOE_ERRLEN];
	struct moe_ckpt *c;
	struct moe_ckpt_tensor t;
	FILE *f;

	assert_int_equal(moe_ckpt_open(ckpt_dir, &c, err), 0);
	assert_int_equal(moe_ckpt_find(c, tensor, &t), 0);
	f = fopen(c->shards[t.shard]->path, "r+b");
	assert_non_null(f);
	fseek(f, (long)(c->shards[t.shard]->data_start + t.t->begin + off), SEEK_SET);
	assert_int_equal(fwrite(p, 1, n, f), n);
	fclose(f);
	moe_ckpt_close(c);
}
