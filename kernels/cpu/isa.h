/* kernels/cpu/isa.h — which CPU kernels run: detection and choice.
 *
 * Paths: scalar (portable C), avx2 (AVX2 + FMA + F16C), avx512 (AVX-512 F/BW/VL
 * + F16C). Detection uses cpuid and xgetbv (the OS must save the registers).
 * The choice is `auto` (the best the CPU has) unless a request (cpu.isa in
 * the config) or the MOE_CPU_ISA environment variable (read by the mains) names one; naming a
 * path the CPU lacks is an error with a message, never a SIGILL.
 */
#ifndef MOE_CPU_ISA_H
#define MOE_CPU_ISA_H

#include <stdbool.h>
#include <stddef.h>

enum moe_cpu_isa { MOE_ISA_SCALAR, MOE_ISA_AVX2, MOE_ISA_AVX512, MOE_ISA_COUNT };

const char *moe_cpu_isa_name(enum moe_cpu_isa isa);
bool moe_cpu_isa_supported(enum moe_cpu_isa isa);
/* True if the CPU has AVX512_BF16 (vdpbf16ps); reported by moe-bench. */
bool moe_cpu_has_avx512_bf16(void);
/* True if the CPU and OS have AMX-TILE and AMX-BF16 (tdpbf16ps). */
bool moe_cpu_has_amx_bf16(void);
/* Asks Linux for the AMX tile data state (per process: call once, before
 * threads use tiles). 0, or -ENOTSUP / -errno with err. */
int moe_cpu_amx_enable(char *err, size_t n);
enum moe_cpu_isa moe_cpu_isa_best(void);

/* Resolves a request ("auto", "scalar", "avx2", "avx512" or NULL = auto);
 * `what` names where it came from in messages (NULL: "cpu.isa").
 * 0 and *out, or -EINVAL / -ENOTSUP with a message in err. */
int moe_cpu_isa_resolve(const char *request, const char *what, enum moe_cpu_isa *out, char *err,
			size_t errlen);

#endif
