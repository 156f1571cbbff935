// CUDA kernels: per-location nearest distance and k-center greedy.
//
// min_distance: one block per (location, chunk of up to QC queries).  The
// chunk's queries sit in shared memory; each warp streams RW bank rows of
// the neighbourhood at a time (coalesced, lane-strided along D), accumulates
// the direct differences to all QC queries at once (so a row is read once per
// chunk, and the chunks of one location run side by side and share L2), and
// keeps a running minimum per query.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

namespace dinopatch::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int QC = 8;  // queries per block
constexpr int RW = 4;  // bank rows per warp step

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(unsigned short x) { return __half2float(__ushort_as_half(x)); }

// NaN-propagating running minimum (as the CPU kernels).
__device__ __forceinline__ void keep_min(float& best, float v) {
  if (best == best && (v < best || v != v)) best = v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void min_distance_kernel(const float* __restrict__ queries, const T* __restrict__ bank,
                                    const int64_t* __restrict__ counts,
                                    const int32_t* __restrict__ radii, float* __restrict__ out,
                                    int64_t B, int64_t L, int64_t K, int64_t D, int64_t h,
                                    int64_t w, int64_t radius, int64_t chunks) {
  extern __shared__ float smem[];  // [QC][D] queries, then [kWarps][QC] minima
  float* sq = smem;
  float* wmin = smem + QC * D;
  const int64_t l = blockIdx.x / chunks, b0 = (blockIdx.x % chunks) * QC;
  const int nq = static_cast<int>(min(static_cast<int64_t>(QC), B - b0));
  for (int64_t i = threadIdx.x; i < QC * D; i += blockDim.x) {
    const int qi = static_cast<int>(i / D);
    sq[i] = qi < nq ? queries[((b0 + qi) * L + l) * D + i % D] : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float best[QC];
#pragma unroll
  for (int i = 0; i < QC; ++i) best[i] = __int_as_float(0x7f800000);  // +inf
  const int64_t y = l / w, x = l % w, rad = radii ? radii[l] : radius;
  for (int64_t yy = max(static_cast<int64_t>(0), y - rad); yy <= min(h - 1, y + rad); ++yy)
    for (int64_t xx = max(static_cast<int64_t>(0), x - rad); xx <= min(w - 1, x + rad); ++xx) {
      const int64_t m = yy * w + xx, n = counts ? counts[m] : K;
      for (int64_t r = warp * RW; r < n; r += kWarps * RW) {
        // RW rows at once: each query value read from shared memory serves
        // RW rows (shared-memory bandwidth, not the FMA units, would bound a
        // one-row loop).  Past the last row, repeat it: a duplicate cannot
        // change a minimum.
        const T* row[RW];
#pragma unroll
        for (int j = 0; j < RW; ++j) row[j] = bank + (m * K + min(r + j, n - 1)) * D;
        float acc[QC][RW];
#pragma unroll
        for (int i = 0; i < QC; ++i)
#pragma unroll
          for (int j = 0; j < RW; ++j) acc[i][j] = 0.f;
        for (int64_t d = lane; d < D; d += 32) {
          float v[RW];
#pragma unroll
          for (int j = 0; j < RW; ++j) v[j] = as_float(row[j][d]);
#pragma unroll
          for (int i = 0; i < QC; ++i) {
            const float qv = sq[i * D + d];
#pragma unroll
            for (int j = 0; j < RW; ++j) {
              const float t = qv - v[j];
              acc[i][j] = fmaf(t, t, acc[i][j]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < QC; ++i)
#pragma unroll
          for (int j = 0; j < RW; ++j) keep_min(best[i], warp_sum(acc[i][j]));
      }
    }
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < QC; ++i) wmin[warp * QC + i] = best[i];
  __syncthreads();
  if (threadIdx.x < nq) {
    float v = wmin[threadIdx.x];
    for (int k = 1; k < kWarps; ++k) keep_min(v, wmin[k * QC + threadIdx.x]);
    out[(b0 + threadIdx.x) * L + l] = sqrtf(v);
  }
}

// (value, index) reductions with the lowest index winning ties, as np.argmin
// / np.argmax.
struct Pick {
  double v;  // double: the first centre compares distances to the mean in double
  int64_t i;
};
__device__ __forceinline__ bool better(Pick a, Pick b, bool largest) {
  if (a.v == b.v) return a.i < b.i;
  return largest ? a.v > b.v : a.v < b.v;
}
__device__ Pick block_pick(Pick p, bool largest, Pick* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    Pick q{__shfl_xor_sync(0xffffffffu, p.v, o), __shfl_xor_sync(0xffffffffu, p.i, o)};
    if (better(q, p, largest)) p = q;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = p;
  __syncthreads();
  p = shared[0];
  for (int k = 1; k < kWarps; ++k)
    if (better(shared[k], p, largest)) p = shared[k];
  __syncthreads();
  return p;
}

__global__ void kcenter_kernel(const float* __restrict__ x, int64_t* __restrict__ out,
                               float* __restrict__ scratch, int64_t N, int64_t D, int64_t k) {
  extern __shared__ double mean[];  // [D]
  __shared__ Pick picks[kWarps];
  const int64_t l = blockIdx.x;
  const float* xl = x + l * N * D;
  float* mind = scratch + l * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double s = 0.0;
    for (int64_t n = 0; n < N; ++n) s += xl[n * D + d];
    mean[d] = s / static_cast<double>(N);
  }
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) mind[n] = __int_as_float(0x7f800000);
  __syncthreads();
  // First centre: the row nearest the mean (double, like the numpy reference).
  Pick p{__longlong_as_double(0x7ff0000000000000LL), 0};  // +inf
  for (int64_t n = warp; n < N; n += kWarps) {
    double s = 0.0;
    for (int64_t d = lane; d < D; d += 32) {
      const double t = xl[n * D + d] - mean[d];
      s += t * t;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const Pick q{s, n};
    if (better(q, p, false)) p = q;
  }
  int64_t c = block_pick(p, false, picks).i;
  for (int64_t j = 0; j < k; ++j) {
    if (threadIdx.x == 0) out[l * k + j] = c;
    Pick far{-1.f, 0};
    for (int64_t n = warp; n < N; n += kWarps) {
      float s = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float t = xl[c * D + d] - xl[n * D + d];
        s = fmaf(t, t, s);
      }
      s = warp_sum(s);
      const float v = fminf(mind[n], s);
      __syncwarp();
      if (lane == 0) mind[n] = v;
      const Pick q{v, n};
      if (better(q, far, true)) far = q;
    }
    c = block_pick(far, true, picks).i;
  }
}

}  // namespace

int device_count() {
  int n = 0;
  // No driver or no device: report none rather than fail the import.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void min_distance(const float* queries, const void* bank, bool f16, const int64_t* counts,
                  float* out, int64_t B, int64_t L, int64_t K, int64_t D, int64_t h, int64_t w,
                  int64_t radius, const int32_t* radii) {
  const int64_t chunks = (B + QC - 1) / QC;
  const size_t smem = (QC * D + kWarps * QC) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(L * chunks));
  if (f16) {
    auto kern = min_distance_kernel<unsigned short>;
    check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "shared memory for D");
    kern<<<grid, kThreads, smem>>>(queries, static_cast<const unsigned short*>(bank), counts, radii,
                                   out, B, L, K, D, h, w, radius, chunks);
  } else {
    auto kern = min_distance_kernel<float>;
    check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "shared memory for D");
    kern<<<grid, kThreads, smem>>>(queries, static_cast<const float*>(bank), counts, radii, out,
                                   B, L, K, D, h, w, radius, chunks);
  }
  check(cudaGetLastError(), "min_distance kernel launch");
}

void kcenter_greedy(const float* x, int64_t* out, float* scratch, int64_t L, int64_t N,
                    int64_t D, int64_t k) {
  const size_t smem = D * sizeof(double);
  check(cudaFuncSetAttribute(kcenter_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem)),
        "shared memory for D");
  kcenter_kernel<<<static_cast<unsigned>(L), kThreads, smem>>>(x, out, scratch, N, D, k);
  check(cudaGetLastError(), "kcenter kernel launch");
}

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "device properties");
  return prop.name;
}

bool is_device_pointer(const void* p) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // a plain host pointer on older runtimes: not an error to keep
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

void* event_create() {
  cudaEvent_t e;
  check(cudaEventCreate(&e), "cudaEventCreate");
  return e;
}
void event_destroy(void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); }
void event_record(void* e) { check(cudaEventRecord(static_cast<cudaEvent_t>(e)), "cudaEventRecord"); }
float event_elapsed_ms(void* start, void* stop) {
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(stop)), "kernel");
  float ms = 0.f;
  check(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(stop)),
        "cudaEventElapsedTime");
  return ms;
}

void* alloc(size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");
  return p;
}
void release(void* p) { cudaFree(p); }
void to_device(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "copy to device");
}
void to_host(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "copy to host");
}
void device_to_device(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "device-to-device copy");
}
void synchronize() { check(cudaDeviceSynchronize(), "kernel"); }

}  // namespace dinopatch::cuda
