/* kernels/cpu/isa.h — which CPU kernels run: detection and choice.
 *
 * Paths: scalar (portable C), avx2 (AVX2 + FMA + F16C), avx512 (AVX-512 F/BW/VL
 * + F16C), avx512bf16 (avx512 + AVX512_BF16: vdpbf16ps on bf16 weights and
 * activations) and amx (avx512bf16 + AMX-TILE/AMX-BF16: tdpbf16ps). The
 * last two run bf16 models only (kernels/cpu/pairs.h); f32/f16 models and
 * fp32 precision run the avx512 kernels on them, which the backend says.
 * Detection uses cpuid and xgetbv (the OS must save the registers); amx
 * also needs Linux's per-process permission for the tile data, asked once
 * (moe_cpu_amx_enable) when the path is chosen.
 *
 * The choice is `auto` unless a request (cpu.isa in the config) or the
 * MOE_CPU_ISA environment variable (read by the mains) names one; naming a
 * path the CPU lacks is an error with a message, never a SIGILL. `auto`
 * picks the best path the CPU has among those marked verified: a path is
 * verified once the whole suite has passed on a CPU that has it (which CPU:
 * bench/RESULTS.md); until then it runs only when named.
 */
#ifndef MOE_CPU_ISA_H
#define MOE_CPU_ISA_H

#include <stdbool.h>
#include <stddef.h>

enum moe_cpu_isa {
	MOE_ISA_SCALAR,
	MOE_ISA_AVX2,
	MOE_ISA_AVX512,
	MOE_ISA_AVX512BF16,
	MOE_ISA_AMX,
	MOE_ISA_COUNT
};

const char *moe_cpu_isa_name(enum moe_cpu_isa isa);
bool moe_cpu_isa_supported(enum moe_cpu_isa isa);
/* True if the CPU has AVX512_BF16 (vdpbf16ps); reported by moe-bench. */
bool moe_cpu_has_avx512_bf16(void);
/* True if the CPU and OS have AMX-TILE and AMX-BF16 (tdpbf16ps). */
bool moe_cpu_has_amx_bf16(void);
/* Asks Linux for the AMX tile data state (per process: call once, before
 * threads use tiles). 0, or -ENOTSUP / -errno with err. */
int moe_cpu_amx_enable(char *err, size_t n);
/* The best verified path the CPU has (what `auto` picks, AMX permission
 * aside: see moe_cpu_isa_resolve). */
enum moe_cpu_isa moe_cpu_isa_best(void);
/* True if the suite has passed on real hardware with this path. */
bool moe_cpu_isa_verified(enum moe_cpu_isa isa);
/* True for the paths that compute with bf16 activations (pairs.h). */
bool moe_cpu_isa_bf16(enum moe_cpu_isa isa);

/* Resolves a request ("auto", a path's name, or NULL = auto); `what` names
 * where it came from in messages (NULL: "cpu.isa"). Choosing amx asks for
 * the tile permission: refused, an explicit request fails, `auto` takes the
 * next best path and says why in err (returning 0; err is "" otherwise).
 * 0 and *out, or -EINVAL / -ENOTSUP with a message in err. */
int moe_cpu_isa_resolve(const char *request, const char *what, enum moe_cpu_isa *out, char *err,
			size_t errlen);

#endif
