#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style>;

#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = R"pbdoc(Compiled CPU kernels of DinoPatch; call them through dinopatch.kernels.)pbdoc";

  m.def(
      "min_distance",
      [](f32 queries, f32 bank) {
        const auto B = queries.shape(0), L = queries.shape(1), D = queries.shape(2);
        const auto K = bank.shape(1);
        py::array_t<float> out({B, L});
        const float* q = queries.data();
        const float* b = bank.data();
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          dinopatch::min_distance_cpu(q, b, o, B, L, K, D);
        }
        return out;
      },
      py::arg("queries"), py::arg("bank"),
      R"pbdoc(queries [B,L,D] f32, bank [L,K,D] f32 -> [B,L] f32 min Euclidean distance.)pbdoc");

  m.def(
      "kcenter_greedy",
      [](f32 x, int64_t k) {
        const auto L = x.shape(0), N = x.shape(1), D = x.shape(2);
        py::array_t<int64_t> out({L, static_cast<py::ssize_t>(k)});
        const float* p = x.data();
        int64_t* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          dinopatch::kcenter_greedy_cpu(p, o, L, N, D, k);
        }
        return out;
      },
      py::arg("x"), py::arg("k"),
      R"pbdoc(x [L,N,D] f32 -> [L,k] int64 greedy k-center indices per location.)pbdoc");

#ifdef VERSION_INFO
  m.attr("__version__") = MACRO_STRINGIFY(VERSION_INFO);
#else
  m.attr("__version__") = "dev";
#endif
}
