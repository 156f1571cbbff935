// dinopatch._bench_C: measurements for `python -m dinopatch.bench` only.  The
// kernels never call it, so it stays out of the instruction-set tables.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

// 64 independent sums, so no add waits on the previous one and the loads
// alone set the pace; the total is returned, so no load can be dropped.  The
// compiler turns the inner loop into vector adds of the caller's width.
inline __attribute__((always_inline)) double lanes_sum(const float* x, int64_t n) {
  constexpr int kLanes = 64;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) double sum_avx512(const float* x, int64_t n) { return lanes_sum(x, n); }
__attribute__((target("avx2"))) double sum_avx2(const float* x, int64_t n) { return lanes_sum(x, n); }
#endif
double sum_plain(const float* x, int64_t n) { return lanes_sum(x, n); }

using SumFn = double (*)(const float*, int64_t);

SumFn widest_sum() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f")) return sum_avx512;
  if (__builtin_cpu_supports("avx2")) return sum_avx2;
#endif
  return sum_plain;
}

// Every thread reads one contiguous slice, as the distance kernel reads the
// bank's locations in order.
double stream_read(const float* x, int64_t n) {
  const SumFn sum = widest_sum();
  double total = 0.0;
#pragma omp parallel reduction(+ : total)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    const int64_t per = ((n + nt - 1) / nt + 63) / 64 * 64;  // whole cache lines per thread
    const int64_t lo = std::min(n, t * per), hi = std::min(n, lo + per);
    total += sum(x + lo, hi - lo);
  }
  return total;
}

}  // namespace

PYBIND11_MODULE(_bench_C, m) {
  m.doc() = R"pbdoc(Bench-only probes of DinoPatch (python -m dinopatch.bench); not used by the kernels.)pbdoc";
  m.def(
      "stream_read",
      [](py::array_t<float, py::array::c_style> x) {
        const float* p = x.data();
        const int64_t n = x.size();
        py::gil_scoped_release release;
        return stream_read(p, n);
      },
      py::arg("x"),
      R"pbdoc(Sum of a float32 array, read once by every OpenMP thread in contiguous slices with
the widest vector loads the CPU has: a memory read-bandwidth probe.)pbdoc");
  m.def(
      "threads",
      [] {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
      },
      R"pbdoc(OpenMP threads stream_read uses.)pbdoc");
}
