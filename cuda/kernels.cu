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

// The arithmetic of one data type: its storage `T`, its accumulator (arith.cuh) and the
// division that ends an average.
template <typename Storage, typename Accumulator>
struct Arith {
  typedef Storage T;
  typedef Accumulator Acc;
};

template <typename T, typename U>
struct IntArith : Arith<T, MwIntAcc<T, U> > {
  __device__ static T div(T x, int n) { return mw_div_int<T>(x, n); }
};
struct F32Arith : Arith<float, MwF32Acc> {
  __device__ static float div(float x, int n) { return x / (float)n; }
};
struct F64Arith : Arith<double, MwF64Acc> {
  __device__ static double div(double x, int n) { return x / (double)n; }
};
template <int BF>
struct HalfArith : Arith<uint16_t, Mw16Acc<BF> > {
  __device__ static uint16_t div(uint16_t x, int n) { return mw_div_16(x, BF, n); }
};

// dst[i] = src[0][i] op src[1][i] op ..., `nsrc` sources whose addresses are in shared memory
// (the caller puts them there: indexing a kernel parameter by a variable would copy it to
// local memory). `divide` > 0: each result is then divided by it, as `mw_scale` would (the end
// of an average in the same pass; the same arithmetic, rounded to T in between).
//
// The vector path keeps one accumulator per lane in registers and walks the sources one 16-byte
// load at a time, so that nothing goes to local memory whatever the number of sources.
template <typename A>
__device__ void mw_combine(int op, typename A::T* dst, const void* const* src, int nsrc, size_t n, int divide) {
  typedef typename A::T T;
  typedef typename A::Acc Acc;
  bool aligned = mw_aligned(dst);
  for (int k = 0; k < nsrc; k++) aligned = aligned && mw_aligned(src[k]);
  size_t start = 0;
  if (aligned) {
    const int lanes = 16 / sizeof(T);
    size_t nvec = n / lanes;
    for (size_t v = mw_tid(); v < nvec; v += mw_threads()) {
      Acc acc[lanes];
      union {
        uint4 u;
        T e[lanes];
      } x;
      x.u = ((const uint4*)src[0])[v];
#pragma unroll
      for (int j = 0; j < lanes; j++) acc[j].init(op, x.e[j]);
      for (int k = 1; k < nsrc; k++) {
        x.u = ((const uint4*)src[k])[v];
#pragma unroll
        for (int j = 0; j < lanes; j++) acc[j].step(op, x.e[j]);
      }
#pragma unroll
      for (int j = 0; j < lanes; j++) {
        T r = acc[j].finish(op);
        x.e[j] = divide > 0 ? A::div(r, divide) : r;
      }
      ((uint4*)dst)[v] = x.u;
    }
    start = nvec * lanes;
  }
  for (size_t i = start + mw_tid(); i < n; i += mw_threads()) {
    Acc a;
    a.init(op, ((const T*)src[0])[i]);
    for (int k = 1; k < nsrc; k++) a.step(op, ((const T*)src[k])[i]);
    T r = a.finish(op);
    dst[i] = divide > 0 ? A::div(r, divide) : r;
  }
}

template <typename A>
__device__ void mw_scale(typename A::T* dst, size_t n, int ranks) {
  for (size_t i = mw_tid(); i < n; i += mw_threads()) dst[i] = A::div(dst[i], ranks);
}

// What a combine descriptor in host-mapped memory holds (u64 words), written by the host
// before it released the stream to the launch: destination, elements (zero: nothing to do),
// sources, reduction, divisor (zero: none), then the sources' addresses.
enum { MW_TOLD_DST = 0, MW_TOLD_N, MW_TOLD_NSRC, MW_TOLD_OP, MW_TOLD_DIVIDE, MW_TOLD_SRC, MW_TOLD_WORDS = MW_TOLD_SRC + MW_MAX_SOURCES };

#define MW_KERNELS(NAME, A)                                                                          \
  extern "C" __global__ void mw_combine_##NAME(int op, A::T* dst, MwSources src, int nsrc, size_t n) { \
    __shared__ const void* p[MW_MAX_SOURCES];                                                      \
    if (threadIdx.x == 0) {                                                                        \
      _Pragma("unroll") for (int k = 0; k < MW_MAX_SOURCES; k++) p[k] = src.p[k];                  \
    }                                                                                              \
    __syncthreads();                                                                               \
    mw_combine<A>(op, dst, p, nsrc, n, 0);                                                         \
  }                                                                                                \
  /* Combines as a descriptor in host-mapped memory says when the kernel runs: for reductions   \
     over a peer's buffer mapped through CUDA IPC, whose address is known only then. One thread \
     per word reads the descriptor (reads over the bus). */                                     \
  extern "C" __global__ void mw_combine_told_##NAME(const volatile unsigned long long* desc) {    \
    __shared__ unsigned long long d[MW_TOLD_WORDS];                                                \
    for (int i = threadIdx.x; i < MW_TOLD_WORDS; i += blockDim.x) d[i] = desc[i];                  \
    __syncthreads();                                                                               \
    int nsrc = (int)d[MW_TOLD_NSRC];                                                               \
    if (d[MW_TOLD_N] == 0 || nsrc < 1 || nsrc > MW_MAX_SOURCES) return;                            \
    mw_combine<A>((int)d[MW_TOLD_OP], (A::T*)d[MW_TOLD_DST], (const void* const*)&d[MW_TOLD_SRC], nsrc, \
                  (size_t)d[MW_TOLD_N], (int)d[MW_TOLD_DIVIDE]);                                   \
  }                                                                                                \
  extern "C" __global__ void mw_scale_##NAME(A::T* dst, size_t n, int ranks) { mw_scale<A>(dst, n, ranks); }

typedef IntArith<int8_t, uint8_t> I8Arith;
typedef IntArith<uint8_t, uint8_t> U8Arith;
typedef IntArith<int32_t, uint32_t> I32Arith;
typedef IntArith<uint32_t, uint32_t> U32Arith;
typedef IntArith<int64_t, uint64_t> I64Arith;
typedef IntArith<uint64_t, uint64_t> U64Arith;
typedef HalfArith<0> F16Arith;
typedef HalfArith<1> BF16Arith;

MW_KERNELS(i8, I8Arith)
MW_KERNELS(u8, U8Arith)
MW_KERNELS(i32, I32Arith)
MW_KERNELS(u32, U32Arith)
MW_KERNELS(i64, I64Arith)
MW_KERNELS(u64, U64Arith)
MW_KERNELS(f16, F16Arith)
MW_KERNELS(f32, F32Arith)
MW_KERNELS(f64, F64Arith)
MW_KERNELS(bf16, BF16Arith)

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

// Copies what `count` descriptors in host-mapped memory say: {source, destination, bytes}
// each, written by the host before it released the stream to this launch (zero bytes: nothing
// to do). For copies whose addresses are known only when the stream gets there, such as a
// peer's buffer mapped through CUDA IPC. One thread per block reads each descriptor (a read
// over the bus). Each block walks the list in order, but blocks run side by side: the copies
// of one launch must not depend on each other (the callers' never overlap). A descriptor the
// host empties while the kernel runs (a failed operation) may be seen by some blocks and not
// others: a partial copy, into an output that failure leaves unspecified anyway.
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
