// Per-element arithmetic of the reduction kernels, written once for the device and the host.
//
// The kernels (kernels.cu) run these functions on the GPU; host_check.cpp compiles the very
// same code with the host C++ compiler, so that the Rust tests check it against the crate's
// reference on a machine without a GPU. Nothing here uses CUDA headers: half and bfloat16 are
// converted in software, bit for bit as the `half` crate does (round to nearest even), and
// integer sums and products wrap (computed in unsigned arithmetic, where C++ defines wrapping).
#pragma once

#include <stdint.h>
#include <string.h>

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif

#define MW_HD __host__ __device__ __forceinline__

// Data types and reductions, numbered as in the crate (and as NCCL's).
enum { MW_I8 = 0, MW_U8, MW_I32, MW_U32, MW_I64, MW_U64, MW_F16, MW_F32, MW_F64, MW_BF16 };
enum { MW_SUM = 0, MW_PROD, MW_MAX, MW_MIN, MW_AVG };

MW_HD uint32_t mw_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
MW_HD float mw_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
MW_HD uint64_t mw_f64_bits(double f) {
  uint64_t u;
  memcpy(&u, &f, 8);
  return u;
}
MW_HD double mw_bits_f64(uint64_t u) {
  double f;
  memcpy(&f, &u, 8);
  return f;
}

MW_HD int mw_clz16(uint32_t v) {
  int n = 0;
  for (uint32_t m = 0x8000; m && !(v & m); m >>= 1) n++;
  return n;
}

MW_HD float mw_f16_to_f32(uint16_t i) {
  uint32_t h = i;
  if ((h & 0x7fff) == 0) return mw_bits_f32(h << 16);
  uint32_t sign = h & 0x8000, exp = h & 0x7c00, man = h & 0x03ff;
  if (exp == 0x7c00) {
    if (man == 0) return mw_bits_f32((sign << 16) | 0x7f800000u);
    return mw_bits_f32((sign << 16) | 0x7fc00000u | (man << 13));
  }
  if (exp == 0) {
    int e = mw_clz16(man) - 6;
    uint32_t ex = (uint32_t)(127 - 15 - e) << 23;
    uint32_t m = (man << (14 + e)) & 0x7fffffu;
    return mw_bits_f32((sign << 16) | ex | m);
  }
  int unbiased = (int)(exp >> 10) - 15;
  return mw_bits_f32((sign << 16) | ((uint32_t)(unbiased + 127) << 23) | (man << 13));
}

MW_HD uint16_t mw_f32_to_f16(float v) {
  uint32_t x = mw_f32_bits(v);
  uint32_t sign = x & 0x80000000u, exp = x & 0x7f800000u, man = x & 0x007fffffu;
  if (exp == 0x7f800000u) {
    uint32_t nan_bit = man == 0 ? 0 : 0x0200u;
    return (uint16_t)((sign >> 16) | 0x7c00u | nan_bit | (man >> 13));
  }
  uint32_t half_sign = sign >> 16;
  int half_exp = (int)(exp >> 23) - 127 + 15;
  if (half_exp >= 0x1f) return (uint16_t)(half_sign | 0x7c00u);
  if (half_exp <= 0) {
    if (14 - half_exp > 24) return (uint16_t)half_sign;
    uint32_t m = man | 0x00800000u;
    uint32_t half_man = m >> (14 - half_exp);
    uint32_t round_bit = 1u << (13 - half_exp);
    if ((m & round_bit) != 0 && (m & (3 * round_bit - 1)) != 0) half_man += 1;
    return (uint16_t)(half_sign | half_man);
  }
  uint32_t out = half_sign | ((uint32_t)half_exp << 10) | (man >> 13);
  uint32_t round_bit = 0x1000u;
  if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0) out += 1;
  return (uint16_t)out;
}

MW_HD float mw_bf16_to_f32(uint16_t i) {
  uint32_t h = i;
  if ((h & 0x7fff) > 0x7f80) return mw_bits_f32((h | 0x40) << 16);
  return mw_bits_f32(h << 16);
}

MW_HD uint16_t mw_f32_to_bf16(float v) {
  uint32_t x = mw_f32_bits(v);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
  uint32_t round_bit = 0x8000u;
  if ((x & round_bit) != 0 && (x & (3 * round_bit - 1)) != 0) return (uint16_t)((x >> 16) + 1);
  return (uint16_t)(x >> 16);
}

// Maximum and minimum that both operand orders agree on bit for bit: equal values (like -0
// and +0) give the bits they share, a NaN first operand wins, a NaN second operand wins over
// a number. The same rules as the host kernels.
MW_HD float mw_fmax32(float a, float b) {
  if (a != a) return a;
  if (a == b) return mw_bits_f32(mw_f32_bits(a) & mw_f32_bits(b));
  return a > b ? a : b;
}
MW_HD float mw_fmin32(float a, float b) {
  if (a != a) return a;
  if (a == b) return mw_bits_f32(mw_f32_bits(a) | mw_f32_bits(b));
  return a < b ? a : b;
}
MW_HD double mw_fmax64(double a, double b) {
  if (a != a) return a;
  if (a == b) return mw_bits_f64(mw_f64_bits(a) & mw_f64_bits(b));
  return a > b ? a : b;
}
MW_HD double mw_fmin64(double a, double b) {
  if (a != a) return a;
  if (a == b) return mw_bits_f64(mw_f64_bits(a) | mw_f64_bits(b));
  return a < b ? a : b;
}

// Integer operations: wrapping sum and product (in unsigned arithmetic), max, min.
template <typename T, typename U>
MW_HD T mw_int_op(int op, T a, T b) {
  switch (op) {
    case MW_PROD: return (T)(U)((U)a * (U)b);
    case MW_MAX: return a > b ? a : b;
    case MW_MIN: return a < b ? a : b;
    default: return (T)(U)((U)a + (U)b);  // MW_SUM, MW_AVG
  }
}

MW_HD float mw_f32_op(int op, float a, float b) {
  switch (op) {
    case MW_PROD: return a * b;
    case MW_MAX: return mw_fmax32(a, b);
    case MW_MIN: return mw_fmin32(a, b);
    default: return a + b;
  }
}

MW_HD double mw_f64_op(int op, double a, double b) {
  switch (op) {
    case MW_PROD: return a * b;
    case MW_MAX: return mw_fmax64(a, b);
    case MW_MIN: return mw_fmin64(a, b);
    default: return a + b;
  }
}

// One element's accumulator across sources, in order: `init` with the first source's value,
// `step` with each next one, `finish` for the result. The kernels keep one per vector lane in
// registers while they walk the sources; the scalar combines below are the same folds. Half and
// bfloat16 accumulate in f32 and round once at the end; max and min of them return the winning
// operand's own bits.
template <typename T, typename U>
struct MwIntAcc {
  T acc;
  MW_HD void init(int, T v) { acc = v; }
  MW_HD void step(int op, T v) { acc = mw_int_op<T, U>(op, acc, v); }
  MW_HD T finish(int) const { return acc; }
};

struct MwF32Acc {
  float acc;
  MW_HD void init(int, float v) { acc = v; }
  MW_HD void step(int op, float v) { acc = mw_f32_op(op, acc, v); }
  MW_HD float finish(int) const { return acc; }
};

struct MwF64Acc {
  double acc;
  MW_HD void init(int, double v) { acc = v; }
  MW_HD void step(int op, double v) { acc = mw_f64_op(op, acc, v); }
  MW_HD double finish(int) const { return acc; }
};

// 16-bit floats, carried as their bits; `BF` selects bfloat16 over IEEE half.
template <int BF>
struct Mw16Acc {
  uint16_t best;
  float acc;
  MW_HD static float widen(uint16_t raw) { return BF ? mw_bf16_to_f32(raw) : mw_f16_to_f32(raw); }
  MW_HD void init(int, uint16_t raw) {
    best = raw;
    acc = widen(raw);
  }
  MW_HD void step(int op, uint16_t raw) {
    float r = mw_f32_op(op, acc, widen(raw));
    // Max and min keep the bits of whichever operand won.
    if ((op == MW_MAX || op == MW_MIN) && mw_f32_bits(r) != mw_f32_bits(acc)) best = raw;
    acc = r;
  }
  MW_HD uint16_t finish(int op) const {
    if (op == MW_MAX || op == MW_MIN) return best;
    return BF ? mw_f32_to_bf16(acc) : mw_f32_to_f16(acc);
  }
};

// Combines element i of `nsrc` sources into one value: sources[0] op sources[1] op ... in
// order, with accumulator A.
template <typename A, typename T>
MW_HD T mw_fold(int op, const T* const* src, int nsrc, size_t i) {
  A a;
  a.init(op, src[0][i]);
  for (int s = 1; s < nsrc; s++) a.step(op, src[s][i]);
  return a.finish(op);
}

template <typename T, typename U>
MW_HD T mw_combine_int(int op, const T* const* src, int nsrc, size_t i) {
  return mw_fold<MwIntAcc<T, U>, T>(op, src, nsrc, i);
}

MW_HD float mw_combine_f32(int op, const float* const* src, int nsrc, size_t i) {
  return mw_fold<MwF32Acc, float>(op, src, nsrc, i);
}

MW_HD double mw_combine_f64(int op, const double* const* src, int nsrc, size_t i) {
  return mw_fold<MwF64Acc, double>(op, src, nsrc, i);
}

MW_HD uint16_t mw_combine_16(int op, int bf, const uint16_t* const* src, int nsrc, size_t i) {
  return bf ? mw_fold<Mw16Acc<1>, uint16_t>(op, src, nsrc, i) : mw_fold<Mw16Acc<0>, uint16_t>(op, src, nsrc, i);
}

// The last step of an average: x / n.
template <typename T>
MW_HD T mw_div_int(T x, int n) {
  // Signed types divide as signed 64-bit, unsigned as unsigned: the divisor always fits.
  if ((T)-1 < (T)0) return (T)((int64_t)x / (int64_t)n);
  return (T)((uint64_t)x / (uint64_t)n);
}
MW_HD uint16_t mw_div_16(uint16_t x, int bf, int n) {
  float f = bf ? mw_bf16_to_f32(x) : mw_f16_to_f32(x);
  f = f / (float)n;
  return bf ? mw_f32_to_bf16(f) : mw_f32_to_f16(f);
}
