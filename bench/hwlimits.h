/* bench/hwlimits.h — the hardware limits a benchmark is held against,
 * measured in the same run: memory read bandwidth with all threads over a
 * working set far larger than the last-level cache, and the peak of the
 * multiply-add the kernels use (fp32 FMA on AVX2/AVX-512; the AVX-512 BF16
 * dot product where the CPU has it is reported beside it). */
#ifndef MOE_BENCH_HWLIMITS_H
#define MOE_BENCH_HWLIMITS_H

#include <stddef.h>
#include <stdint.h>

struct moe_pool;

/* Best of several passes of reading `bytes` with every pool thread, each
 * thread with one and (other passes) four interleaved streams: B/s. */
double moe_bench_read_bw(struct moe_pool *pool, size_t bytes);

/* Peak FLOP/s of fp32 FMA with every pool thread, using the widest vectors
 * of `isa` (0 scalar, 1 avx2, 2 avx512); *what names the instruction. */
double moe_bench_fma_peak(struct moe_pool *pool, int isa, const char **what);

/* Peak of vdpbf16ps (2 FLOP per bf16 pair), or 0 without AVX512_BF16. */
double moe_bench_bf16_peak(struct moe_pool *pool);

/* Peak of AMX tdpbf16ps with every pool thread (tiles in registers), or 0
 * with why (no AMX-BF16, or the kernel refused the tile state). */
double moe_bench_amx_peak(struct moe_pool *pool, char *why, size_t n);

/* The last-level cache's size (the largest level sysfs lists for cpu0), or 0. */
uint64_t moe_bench_llc_bytes(void);

double moe_bench_now(void);

/* qsort's comparator for doubles, ascending. */
int moe_bench_cmp_double(const void *a, const void *b);

#endif
