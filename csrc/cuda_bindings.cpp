// dinopatch._C_cuda: the CUDA kernels behind dinopatch.kernels' "cuda" backend.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"
#include "size_checks.h"

namespace py = pybind11;
namespace dc = dinopatch::cuda;
using f32 = py::array_t<float, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;

namespace {

// A device allocation that frees itself.
struct Buffer {
  void* p = nullptr;
  explicit Buffer(size_t bytes) : p(dc::alloc(bytes)) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { dc::release(p); }
};

// Checked before anything is allocated on the device.
const py::array& checked(const py::array& bank, bool f16) {
  const char kind = bank.dtype().kind();
  if (bank.ndim() != 3 || bank.shape(1) < 1 || bank.shape(2) < 1 ||
      bank.itemsize() != (f16 ? 2 : 4) || kind != (f16 ? 'u' : 'f') ||
      !(bank.flags() & py::array::c_style))
    throw std::invalid_argument(
        "bank must be a C-contiguous [L,K,D] float32 array (uint16 bits of float16 when f16), "
        "K, D >= 1");
  return bank;
}

// A bank uploaded once and queried many times (dinopatch.kernels caches one
// per bank array; the GPU benchmark uses it directly).
class DeviceBank {
 public:
  DeviceBank(py::array bank, bool f16, py::object counts)
      : L_(checked(bank, f16).shape(0)),
        K_(bank.shape(1)),
        D_(bank.shape(2)),
        f16_(f16),
        bank_(bank.nbytes()),
        counts_(counts.is_none() ? 0 : L_ * sizeof(int64_t)),
        has_counts_(!counts.is_none()) {
    const void* src = bank.data();
    {
      py::gil_scoped_release release;
      dc::to_device(bank_.p, src, bank.nbytes());
    }
    if (has_counts_) {
      const auto c = counts.cast<i64>();
      if (c.ndim() != 1 || c.shape(0) != L_)
        throw std::invalid_argument("counts must have shape (L,)");
      for (py::ssize_t i = 0; i < L_; ++i)
        if (c.at(i) < 1 || c.at(i) > K_) throw std::invalid_argument("counts must lie in [1, K]");
      dc::to_device(counts_.p, c.data(), L_ * sizeof(int64_t));
    }
  }

  f32 min_distance(f32 queries, int64_t h, int64_t w, int64_t radius) {
    if (queries.ndim() != 3 || queries.shape(1) != L_ || queries.shape(2) != D_)
      throw std::invalid_argument("queries must be [B,L,D] matching the bank's L and D");
    radius = dinopatch::grid_radius(h, w, L_, radius);
    const int64_t B = queries.shape(0);
    dinopatch::checked_size({B, L_, D_, sizeof(float)}, "B * L * D bytes");
    f32 out({B, static_cast<int64_t>(L_)});
    if (B == 0) return out;
    const float* qh = queries.data();
    float* oh = out.mutable_data();
    {
      py::gil_scoped_release release;
      Buffer q(queries.nbytes()), o(B * L_ * sizeof(float));
      dc::to_device(q.p, qh, queries.nbytes());
      dc::min_distance(static_cast<const float*>(q.p), bank_.p, f16_,
                       has_counts_ ? static_cast<const int64_t*>(counts_.p) : nullptr,
                       static_cast<float*>(o.p), B, L_, K_, D_, h, w, radius);
      dc::to_host(oh, o.p, B * L_ * sizeof(float));
    }
    return out;
  }

  size_t nbytes() const { return static_cast<size_t>(L_ * K_ * D_ * (f16_ ? 2 : 4)); }

 private:
  py::ssize_t L_, K_, D_;
  bool f16_;
  Buffer bank_, counts_;
  bool has_counts_;
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = R"pbdoc(CUDA kernels of DinoPatch; call them through dinopatch.kernels.)pbdoc";
  m.def("device_count", &dc::device_count, "CUDA devices visible (0 without a driver or GPU).");

  py::class_<DeviceBank>(m, "DeviceBank")
      .def(py::init<py::array, bool, py::object>(), py::arg("bank"), py::arg("f16") = false,
           py::arg("counts") = py::none())
      .def("min_distance", &DeviceBank::min_distance, py::arg("queries"), py::arg("h"),
           py::arg("w"), py::arg("radius") = 0)
      .def_property_readonly("nbytes", &DeviceBank::nbytes);

  m.def(
      "min_distance",
      [](f32 queries, py::array bank, py::object counts, int64_t h, int64_t w, int64_t radius,
         bool f16) { return DeviceBank(bank, f16, counts).min_distance(queries, h, w, radius); },
      py::arg("queries"), py::arg("bank"), py::arg("counts"), py::arg("h"), py::arg("w"),
      py::arg("radius"), py::arg("f16"),
      R"pbdoc(As dinopatch._C.min_distance; the bank is uploaded for this call.)pbdoc");

  m.def(
      "kcenter_greedy",
      [](f32 x, int64_t k) {
        if (x.ndim() != 3 || k < 1 || k > x.shape(1))
          throw std::invalid_argument("x must be [L,N,D] with 1 <= k <= N");
        const int64_t L = x.shape(0), N = x.shape(1), D = x.shape(2);
        dinopatch::checked_size({L, N, D, sizeof(float)}, "L * N * D bytes");
        dinopatch::checked_size({L, k, sizeof(int64_t)}, "L * k bytes");
        py::array_t<int64_t> out({L, k});
        const float* xh = x.data();
        int64_t* oh = out.mutable_data();
        {
          py::gil_scoped_release release;
          Buffer xd(x.nbytes()), od(L * k * sizeof(int64_t)), scratch(L * N * sizeof(float));
          dc::to_device(xd.p, xh, x.nbytes());
          dc::kcenter_greedy(static_cast<const float*>(xd.p), static_cast<int64_t*>(od.p),
                             static_cast<float*>(scratch.p), L, N, D, k);
          dc::to_host(oh, od.p, L * k * sizeof(int64_t));
        }
        return out;
      },
      py::arg("x"), py::arg("k"));
  m.def("synchronize", &dc::synchronize);
}
