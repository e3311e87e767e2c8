/* kernels/cpu/exp_poly.h — the constants of the vector e^x the SIMD paths
 * share (simd512.h, panel_avx2.c): Cody-Waite range reduction
 * x = n ln2 + r with ln2 split in a high part exact in a few bits and a
 * low part, then a degree-6 polynomial on |r| <= ln2/2, within 2 ulp of
 * expf over the range they clamp x to. */
#ifndef MOE_CPU_EXP_POLY_H
#define MOE_CPU_EXP_POLY_H

#define MOE_EXP_LOG2E  1.44269504088896341f
#define MOE_EXP_LN2_HI 0.693359375f
#define MOE_EXP_LN2_LO (-2.12194440e-4f)
#define MOE_EXP_P0     1.9875691500e-4f
#define MOE_EXP_P1     1.3981999507e-3f
#define MOE_EXP_P2     8.3334519073e-3f
#define MOE_EXP_P3     4.1665795894e-2f
#define MOE_EXP_P4     1.6666665459e-1f
#define MOE_EXP_P5     5.0000001201e-1f

/* The polynomial's first five Horner steps in r for any vector width,
 * given its fmadd and set1 intrinsics; the caller ends with
 * p * r^2 + (r + 1). */
#define MOE_EXP_HORNER(fmadd, set1, r)                                                     \
	fmadd(fmadd(fmadd(fmadd(fmadd(set1(MOE_EXP_P0), r, set1(MOE_EXP_P1)), r,           \
				set1(MOE_EXP_P2)),                                         \
			  r, set1(MOE_EXP_P3)),                                            \
		    r, set1(MOE_EXP_P4)),                                                  \
	      r, set1(MOE_EXP_P5))

#endif
