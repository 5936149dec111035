/* Vectorisable exp2 shared by the CPU kernels (the csrc folders of kernels/; kernels/native.py puts
   this folder on the include path). */
#ifndef TITANFORGE_EXP2_H
#define TITANFORGE_EXP2_H

#include <math.h>
#include <stdint.h>

/* 2^x for float, vectorisable: x = i + f with i = floor(x), 2^f by a degree-6 polynomial on [0, 1)
   (relative error < 1e-7 in float32 arithmetic) times 2^i made from exponent bits. x is clamped to
   [-126, 126]: the scan's decays 2^(delta A log2 e) <= 1 are 0 for any purpose below 2^-126 (the
   result is then ~1e-38 instead of a denormal or 0), and a sigmoid 1 / (1 + 2^(-x log2 e)) is
   exact to float precision at the clamp. */
static inline __attribute__((always_inline)) float exp2_f32(float x) {
    x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
    float fi = floorf(x);
    float f = x - fi;
    float p = 2.18775165e-04f;
    p = p * f + 1.23878315e-03f;
    p = p * f + 9.68457748e-03f;
    p = p * f + 5.54804291e-02f;
    p = p * f + 2.40230501e-01f;
    p = p * f + 6.93146929e-01f;
    p = p * f + 1.0f;
    /* 2^i as a float built from its exponent bits (a union: memcpy punning does not vectorise) */
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)fi + 127) << 23;
    return p * scale.f;
}

/* float64 is the reference-precision path (tests); libm's exp2 is exact enough and speed is moot. */
static inline double exp2_f64(double x) { return exp2(x); }

#define LOG2E 1.4426950408889634

/* 1 / (1 + e^-x) through the exp2 above (vectorisable in float32; libm in float64) */
static inline __attribute__((always_inline)) float sigmoid_f32(float x) {
    return 1.0f / (1.0f + exp2_f32(-x * (float)LOG2E));
}
static inline double sigmoid_f64(double x) { return 1.0 / (1.0 + exp2_f64(-x * LOG2E)); }

#endif
