#include "kernels/cpu/isa.h"

#include <cpuid.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *const names[MOE_ISA_COUNT] = {"scalar", "avx2", "avx512", "avx512bf16",
						 "amx"};

/* Paths the whole suite has passed with on a CPU that has them (which CPU
 * and when: bench/RESULTS.md, "CPU paths verified"). */
static const bool verified[MOE_ISA_COUNT] = {
	[MOE_ISA_SCALAR] = true,
	[MOE_ISA_AVX2] = true,
	[MOE_ISA_AVX512] = true,
	[MOE_ISA_AVX512BF16] = true,
	[MOE_ISA_AMX] = true,
};

const char *moe_cpu_isa_name(enum moe_cpu_isa isa)
{
	return (unsigned)isa < MOE_ISA_COUNT ? names[isa] : "?";
}

static uint64_t xcr0(void)
{
	uint32_t lo, hi;

	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((uint64_t)hi << 32) | lo;
}

struct features {
	bool avx2, fma, f16c, avx512, bf16, amx_bf16;
};

static struct features detect(void)
{
	struct features f = {0};
	unsigned a, b, c, d;
	uint64_t x;

	if (!__get_cpuid(1, &a, &b, &c, &d))
		return f;
	bool osxsave = c & (1u << 27), avx = c & (1u << 28);

	f.fma = c & (1u << 12);
	f.f16c = c & (1u << 29);
	if (!osxsave || !avx)
		return f;
	x = xcr0();
	if ((x & 0x6) != 0x6) /* XMM and YMM state */
		return f;
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return f;
	f.avx2 = (b & (1u << 5)) && f.fma && f.f16c;
	/* F, BW, VL and the opmask/ZMM state */
	f.avx512 = f.avx2 && (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) &&
		   (x & 0xe0) == 0xe0;
	/* AMX-TILE (EDX 24) and AMX-BF16 (EDX 22), XTILECFG and XTILEDATA
	 * state enabled by the OS (XCR0 bits 17, 18) */
	f.amx_bf16 = (d & (1u << 24)) && (d & (1u << 22)) && (x & 0x60000) == 0x60000;
	if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
		f.bf16 = a & (1u << 5);
	return f;
}

bool moe_cpu_isa_supported(enum moe_cpu_isa isa)
{
	struct features f = detect();

	switch (isa) {
	case MOE_ISA_SCALAR:
		return true;
	case MOE_ISA_AVX2:
		return f.avx2;
	case MOE_ISA_AVX512:
		return f.avx512;
	case MOE_ISA_AVX512BF16:
		return f.avx512 && f.bf16;
	case MOE_ISA_AMX:
		return f.avx512 && f.bf16 && f.amx_bf16;
	default:
		return false;
	}
}

bool moe_cpu_has_avx512_bf16(void)
{
	return detect().bf16;
}

bool moe_cpu_has_amx_bf16(void)
{
	return detect().amx_bf16;
}

/* Asked once per process: the answer does not change. */
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_ret;
static char amx_err[160];

static void amx_ask(void)
{
	enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };

	if (!detect().amx_bf16) {
		snprintf(amx_err, sizeof(amx_err), "this CPU (or its OS) has no AMX-BF16");
		amx_ret = -ENOTSUP;
		return;
	}
	/* Linux >= 5.16: the tile data state is granted per process (every
	 * thread, those already running included) */
	if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
		amx_ret = -errno;
		snprintf(amx_err, sizeof(amx_err), "the kernel refused AMX tile data (arch_prctl: %s)",
			 strerror(-amx_ret));
	}
}

int moe_cpu_amx_enable(char *err, size_t n)
{
	pthread_once(&amx_once, amx_ask);
	if (amx_ret)
		snprintf(err, n, "%s", amx_err);
	return amx_ret;
}

bool moe_cpu_isa_verified(enum moe_cpu_isa isa)
{
	return (unsigned)isa < MOE_ISA_COUNT && verified[isa];
}

bool moe_cpu_isa_bf16(enum moe_cpu_isa isa)
{
	return isa == MOE_ISA_AVX512BF16 || isa == MOE_ISA_AMX;
}

enum moe_cpu_isa moe_cpu_isa_best(void)
{
	for (int i = MOE_ISA_COUNT - 1; i > 0; i--)
		if (verified[i] && moe_cpu_isa_supported((enum moe_cpu_isa)i))
			return (enum moe_cpu_isa)i;
	return MOE_ISA_SCALAR;
}

int moe_cpu_isa_resolve(const char *request, const char *what, enum moe_cpu_isa *out, char *err,
			size_t errlen)
{
	const char *s = request;

	if (!what)
		what = "cpu.isa";

	if (errlen)
		err[0] = 0;
	if (!s || strcmp(s, "auto") == 0) {
		char why[160];

		*out = moe_cpu_isa_best();
		if (*out == MOE_ISA_AMX && moe_cpu_amx_enable(why, sizeof(why))) {
			*out = MOE_ISA_AVX512BF16;
			snprintf(err, errlen, "amx not used: %s; running avx512bf16", why);
		}
		return 0;
	}
	for (int i = 0; i < MOE_ISA_COUNT; i++) {
		if (strcmp(s, names[i]) != 0)
			continue;
		if (!moe_cpu_isa_supported((enum moe_cpu_isa)i)) {
			snprintf(err, errlen, "%s=%s: this CPU does not support %s (best: %s)",
				 what, s, s, names[moe_cpu_isa_best()]);
			return -ENOTSUP;
		}
		if (i == MOE_ISA_AMX) {
			char why[160];
			int ret = moe_cpu_amx_enable(why, sizeof(why));

			if (ret) {
				snprintf(err, errlen, "%s=amx: %s", what, why);
				return ret;
			}
		}
		*out = (enum moe_cpu_isa)i;
		return 0;
	}
	snprintf(err, errlen, "%s=%s: unknown (auto, scalar, avx2, avx512, avx512bf16, amx)",
		 what, s);
	return -EINVAL;
}
