// multiworld's CUDA kernels: element-wise reduction of up to 8 sources into one destination,
// the last step of an average, and a chunk copy. Compiled by build.rs into a fatbin (SASS for
// sm_80 and sm_90, PTX for newer GPUs) that the crate embeds and loads at run time.
//
// Every kernel is grid-stride. When all its pointers are 16-byte aligned it moves 16 bytes per
// thread and step (one uint4 per source), else one element. The arithmetic per element is in
// arith.cuh, shared with the host check.
#include "arith.cuh"

#define MW_MAX_SOURCES 8

struct MwSources {
  const void* p[MW_MAX_SOURCES];
};

__device__ __forceinline__ bool mw_aligned(const void* p) { return ((uintptr_t)p & 15) == 0; }

__device__ __forceinline__ size_t mw_tid() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t mw_threads() { return (size_t)gridDim.x * blockDim.x; }

// One element (or one lane of a vector) of type T: the per-type combine of arith.cuh.
template <typename T>
struct Combine;

#define MW_INT_COMBINE(T, U)                                                                      \
  template <>                                                                                     \
  struct Combine<T> {                                                                             \
    __device__ static T run(int op, const T* const* s, int n, size_t i) {                         \
      return mw_combine_int<T, U>(op, s, n, i);                                                   \
    }                                                                                             \
    __device__ static T div(T x, int n) { return mw_div_int<T>(x, n); }                           \
  };
MW_INT_COMBINE(int8_t, uint8_t)
MW_INT_COMBINE(uint8_t, uint8_t)
MW_INT_COMBINE(int32_t, uint32_t)
MW_INT_COMBINE(uint32_t, uint32_t)
MW_INT_COMBINE(int64_t, uint64_t)
MW_INT_COMBINE(uint64_t, uint64_t)

template <>
struct Combine<float> {
  __device__ static float run(int op, const float* const* s, int n, size_t i) { return mw_combine_f32(op, s, n, i); }
  __device__ static float div(float x, int n) { return x / (float)n; }
};
template <>
struct Combine<double> {
  __device__ static double run(int op, const double* const* s, int n, size_t i) { return mw_combine_f64(op, s, n, i); }
  __device__ static double div(double x, int n) { return x / (double)n; }
};

// 16-bit floats are carried as raw uint16_t; BF selects bfloat16.
template <int BF>
struct Half {
  uint16_t bits;
};
template <int BF>
struct Combine<Half<BF>> {
  __device__ static Half<BF> run(int op, const Half<BF>* const* s, int n, size_t i) {
    return Half<BF>{mw_combine_16(op, BF, (const uint16_t* const*)s, n, i)};
  }
  __device__ static Half<BF> div(Half<BF> x, int n) { return Half<BF>{mw_div_16(x.bits, BF, n)}; }
};

// `divide` > 0: each result is then divided by it, as `mw_scale` would (the end of an average
// done in one pass; the same arithmetic, rounded to T in between).
template <typename T>
__device__ void mw_combine(int op, T* dst, MwSources src, int nsrc, size_t n, int divide) {
  const T* s[MW_MAX_SOURCES];
  bool aligned = mw_aligned(dst);
  for (int k = 0; k < nsrc; k++) {
    s[k] = (const T*)src.p[k];
    aligned = aligned && mw_aligned(s[k]);
  }
  size_t start = 0;
  if (aligned && sizeof(T) <= 16) {
    const int lanes = 16 / sizeof(T);
    size_t nvec = n / lanes;
    for (size_t v = mw_tid(); v < nvec; v += mw_threads()) {
      uint4 in[MW_MAX_SOURCES];
      const T* lane_src[MW_MAX_SOURCES];
      for (int k = 0; k < nsrc; k++) {
        in[k] = ((const uint4*)s[k])[v];
        lane_src[k] = (const T*)&in[k];
      }
      uint4 out;
      T* o = (T*)&out;
      for (int j = 0; j < lanes; j++) {
        o[j] = Combine<T>::run(op, lane_src, nsrc, j);
        if (divide > 0) o[j] = Combine<T>::div(o[j], divide);
      }
      ((uint4*)dst)[v] = out;
    }
    start = nvec * lanes;
  }
  for (size_t i = start + mw_tid(); i < n; i += mw_threads()) {
    T r = Combine<T>::run(op, s, nsrc, i);
    dst[i] = divide > 0 ? Combine<T>::div(r, divide) : r;
  }
}

// What a combine descriptor in host-mapped memory holds (u64 words), written by the host
// before it released the stream to the launch: destination, elements (zero: nothing to do),
// sources, reduction, divisor (zero: none), then the sources' addresses.
enum { MW_TOLD_DST = 0, MW_TOLD_N, MW_TOLD_NSRC, MW_TOLD_OP, MW_TOLD_DIVIDE, MW_TOLD_SRC, MW_TOLD_WORDS = MW_TOLD_SRC + MW_MAX_SOURCES };

// Combines as a descriptor says; for reductions over a peer's buffer mapped through CUDA IPC,
// whose address is known only when the stream gets there. One thread per block reads the
// descriptor (reads over the bus).
template <typename T>
__device__ void mw_combine_told(const volatile unsigned long long* desc) {
  __shared__ unsigned long long d[MW_TOLD_WORDS];
  if (threadIdx.x < MW_TOLD_WORDS) d[threadIdx.x] = desc[threadIdx.x];
  __syncthreads();
  int nsrc = (int)d[MW_TOLD_NSRC];
  if (d[MW_TOLD_N] == 0 || nsrc < 1 || nsrc > MW_MAX_SOURCES) return;
  MwSources src;
  for (int k = 0; k < MW_MAX_SOURCES; k++) src.p[k] = (const void*)d[MW_TOLD_SRC + k];
  mw_combine<T>((int)d[MW_TOLD_OP], (T*)d[MW_TOLD_DST], src, nsrc, (size_t)d[MW_TOLD_N], (int)d[MW_TOLD_DIVIDE]);
}

template <typename T>
__device__ void mw_scale(T* dst, size_t n, int ranks) {
  for (size_t i = mw_tid(); i < n; i += mw_threads()) dst[i] = Combine<T>::div(dst[i], ranks);
}

#define MW_KERNELS(NAME, T)                                                                       \
  extern "C" __global__ void mw_combine_##NAME(int op, T* dst, MwSources src, int nsrc, size_t n) { \
    mw_combine<T>(op, dst, src, nsrc, n, 0);                                                      \
  }                                                                                               \
  extern "C" __global__ void mw_combine_told_##NAME(const volatile unsigned long long* desc) {    \
    mw_combine_told<T>(desc);                                                                     \
  }                                                                                               \
  extern "C" __global__ void mw_scale_##NAME(T* dst, size_t n, int ranks) { mw_scale<T>(dst, n, ranks); }

MW_KERNELS(i8, int8_t)
MW_KERNELS(u8, uint8_t)
MW_KERNELS(i32, int32_t)
MW_KERNELS(u32, uint32_t)
MW_KERNELS(i64, int64_t)
MW_KERNELS(u64, uint64_t)
MW_KERNELS(f16, Half<0>)
MW_KERNELS(f32, float)
MW_KERNELS(f64, double)
MW_KERNELS(bf16, Half<1>)

// Copies `bytes` bytes, 16 at a time where both ends are aligned.
__device__ void mw_copy_bytes(unsigned char* dst, const unsigned char* src, size_t bytes) {
  size_t start = 0;
  if (mw_aligned(dst) && mw_aligned(src)) {
    size_t nvec = bytes / 16;
    for (size_t v = mw_tid(); v < nvec; v += mw_threads()) ((uint4*)dst)[v] = ((const uint4*)src)[v];
    start = nvec * 16;
  }
  for (size_t i = start + mw_tid(); i < bytes; i += mw_threads()) dst[i] = src[i];
}

extern "C" __global__ void mw_copy(unsigned char* dst, const unsigned char* src, size_t bytes) {
  mw_copy_bytes(dst, src, bytes);
}

// Copies what `count` descriptors in host-mapped memory say, one after the other: {source,
// destination, bytes} each, written by the host before it released the stream to this launch
// (zero bytes: nothing to do). For copies whose addresses are known only when the stream gets
// there, such as a peer's buffer mapped through CUDA IPC. One thread per block reads each
// descriptor (a read over the bus).
extern "C" __global__ void mw_copy_told(const volatile unsigned long long* desc, int count) {
  __shared__ unsigned long long d[3];
  for (int k = 0; k < count; k++) {
    if (threadIdx.x == 0) {
      d[0] = desc[3 * k];
      d[1] = desc[3 * k + 1];
      d[2] = desc[3 * k + 2];
    }
    __syncthreads();
    mw_copy_bytes((unsigned char*)d[1], (const unsigned char*)d[0], (size_t)d[2]);
    // Every thread has read `d` before the next descriptor replaces it.
    __syncthreads();
  }
}
