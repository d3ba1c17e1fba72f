// The kernels' per-element arithmetic (arith.cuh), compiled for the host, so that the Rust
// tests check it against the crate's reference without a GPU. One scalar loop per call.
#include "arith.cuh"

extern "C" {

// dst[i] = src[0][i] op src[1][i] op ... (nsrc sources, as the combine kernels compute it).
void mw_host_combine(int dtype, int op, void* dst, const void* const* src, int nsrc, size_t n) {
  for (size_t i = 0; i < n; i++) {
    switch (dtype) {
      case MW_I8: ((int8_t*)dst)[i] = mw_combine_int<int8_t, uint8_t>(op, (const int8_t* const*)src, nsrc, i); break;
      case MW_U8: ((uint8_t*)dst)[i] = mw_combine_int<uint8_t, uint8_t>(op, (const uint8_t* const*)src, nsrc, i); break;
      case MW_I32: ((int32_t*)dst)[i] = mw_combine_int<int32_t, uint32_t>(op, (const int32_t* const*)src, nsrc, i); break;
      case MW_U32: ((uint32_t*)dst)[i] = mw_combine_int<uint32_t, uint32_t>(op, (const uint32_t* const*)src, nsrc, i); break;
      case MW_I64: ((int64_t*)dst)[i] = mw_combine_int<int64_t, uint64_t>(op, (const int64_t* const*)src, nsrc, i); break;
      case MW_U64: ((uint64_t*)dst)[i] = mw_combine_int<uint64_t, uint64_t>(op, (const uint64_t* const*)src, nsrc, i); break;
      case MW_F32: ((float*)dst)[i] = mw_combine_f32(op, (const float* const*)src, nsrc, i); break;
      case MW_F64: ((double*)dst)[i] = mw_combine_f64(op, (const double* const*)src, nsrc, i); break;
      case MW_F16: ((uint16_t*)dst)[i] = mw_combine_16(op, 0, (const uint16_t* const*)src, nsrc, i); break;
      case MW_BF16: ((uint16_t*)dst)[i] = mw_combine_16(op, 1, (const uint16_t* const*)src, nsrc, i); break;
    }
  }
}

// dst[i] = dst[i] / ranks (the last step of an average).
void mw_host_scale(int dtype, void* dst, size_t n, int ranks) {
  for (size_t i = 0; i < n; i++) {
    switch (dtype) {
      case MW_I8: ((int8_t*)dst)[i] = mw_div_int<int8_t>(((int8_t*)dst)[i], ranks); break;
      case MW_U8: ((uint8_t*)dst)[i] = mw_div_int<uint8_t>(((uint8_t*)dst)[i], ranks); break;
      case MW_I32: ((int32_t*)dst)[i] = mw_div_int<int32_t>(((int32_t*)dst)[i], ranks); break;
      case MW_U32: ((uint32_t*)dst)[i] = mw_div_int<uint32_t>(((uint32_t*)dst)[i], ranks); break;
      case MW_I64: ((int64_t*)dst)[i] = mw_div_int<int64_t>(((int64_t*)dst)[i], ranks); break;
      case MW_U64: ((uint64_t*)dst)[i] = mw_div_int<uint64_t>(((uint64_t*)dst)[i], ranks); break;
      case MW_F32: ((float*)dst)[i] = ((float*)dst)[i] / (float)ranks; break;
      case MW_F64: ((double*)dst)[i] = ((double*)dst)[i] / (double)ranks; break;
      case MW_F16: ((uint16_t*)dst)[i] = mw_div_16(((uint16_t*)dst)[i], 0, ranks); break;
      case MW_BF16: ((uint16_t*)dst)[i] = mw_div_16(((uint16_t*)dst)[i], 1, ranks); break;
    }
  }
}
}
