/* tests/testutil.h — helpers shared by the cmocka suites. */
#ifndef MOE_TESTUTIL_H
#define MOE_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "formats/safetensors.h"
#include "kernels/dtype.h"

/* A fresh temporary directory (removed with tu_rmtree). */
char *tu_tmpdir(void);
void tu_rmtree(const char *dir);
/* Writes `len` bytes to dir/name; returns the malloc'd path. */
char *tu_write_file(const char *dir, const char *name, const void *p, size_t len);

/* Reads a whole tensor of a safetensors file, widened to double (F64, F32,
 * BF16, F16, I32). Returns malloc'd data and its element count. */
double *tu_read_f64(const struct moe_st_file *f, const char *name, size_t *n);

/* The tolerance of DESIGN.md: |y - ref| <= atol * rms(ref row) + rtol * |ref|.
 * Returns the worst ratio |y - ref| / (atol*rms + rtol*|ref|) over the rows
 * (<= 1 passes); `what` names the comparison when printing the worst case. */
double tu_check_rows(const char *what, const double *y, const double *ref, size_t rows,
		     size_t cols, double atol, double rtol);

/* Widen n values of dtype dt to double. */
void tu_to_f64(enum moe_dtype dt, const void *src, double *dst, size_t n);

/* A copy of directory `from` at `to` (replacing it); fails the test on error. */
void tu_copy_dir(const char *from, const char *to);
/* Writes n bytes at byte `off` of a checkpoint tensor's data, in place. */
void tu_poke_tensor(const char *ckpt_dir, const char *tensor, uint64_t off, const void *p,
		    size_t n);

/* The number of online CPUs (>= 1). */
unsigned tu_ncpu(void);

#endif
