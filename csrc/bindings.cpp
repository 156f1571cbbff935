#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "radius_arg.h"
#include "size_checks.h"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style>;
using u16 = py::array_t<uint16_t, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;

#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)

namespace {

// dinopatch.kernels checks everything first with friendlier messages; these
// checks keep a direct call from reading out of bounds.
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + ")";
}

// Returns the radius or radius map to use (see parse_radius).
dinopatch::Radius check_min_distance(const f32& q, const py::array& bank, const py::object& counts,
                                     int64_t h, int64_t w, const py::object& radius) {
  if (q.ndim() != 3 || bank.ndim() != 3 || q.shape(1) != bank.shape(0) ||
      q.shape(2) != bank.shape(2) || bank.shape(1) < 1 || bank.shape(2) < 1)
    throw std::invalid_argument("queries " + shape_str(q) + " [B,L,D] and bank " +
                                shape_str(bank) + " [L,K,D] must agree on L and D, K >= 1, D >= 1");
  dinopatch::checked_size({q.shape(0), q.shape(1), q.shape(2)}, "B * L * D");
  dinopatch::checked_size({bank.shape(0), bank.shape(1), bank.shape(2)}, "L * K * D");
  auto r = dinopatch::parse_radius(radius, h, w, bank.shape(0));
  if (!counts.is_none()) {
    const auto c = counts.cast<i64>();
    if (c.ndim() != 1 || c.shape(0) != bank.shape(0))
      throw std::invalid_argument("counts " + shape_str(c) + " must have shape (L,)");
    for (py::ssize_t i = 0; i < c.shape(0); ++i)
      if (c.at(i) < 1 || c.at(i) > bank.shape(1))
        throw std::invalid_argument("counts must lie in [1, K]");
  }
  return r;
}

template <typename Array, typename T>
f32 min_distance(f32 queries, Array bank, py::object counts, int64_t h, int64_t w,
                 py::object radius) {
  const dinopatch::Radius r = check_min_distance(queries, bank, counts, h, w, radius);
  const auto B = queries.shape(0), L = queries.shape(1), D = queries.shape(2);
  const auto K = bank.shape(1);
  f32 out({B, L});
  if (B == 0 || L == 0) return out;  // the kernels split work by B and L: nothing to split
  i64 c;
  if (!counts.is_none()) c = counts.cast<i64>();
  const int64_t* cp = counts.is_none() ? nullptr : c.data();
  const float* q = queries.data();
  const T* b = bank.data();
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    dinopatch::min_distance_cpu(q, b, cp, o, B, L, K, D, h, w, r.scalar, r.data());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = R"pbdoc(Compiled CPU kernels of DinoPatch; call them through dinopatch.kernels.)pbdoc";

  m.def("min_distance", &min_distance<f32, float>, py::arg("queries"), py::arg("bank"),
        py::arg("counts") = py::none(), py::arg("h"), py::arg("w"), py::arg("radius") = 0,
        R"pbdoc(queries [B,L,D] f32, bank [L,K,D] f32, counts [L] int64 or None, grid h x w,
radius (an int, or an [L] integer array: a radius per location) -> [B,L] f32 min Euclidean
distance over the neighbourhood.)pbdoc");
  m.def("min_distance_f16", &min_distance<u16, uint16_t>, py::arg("queries"), py::arg("bank"),
        py::arg("counts") = py::none(), py::arg("h"), py::arg("w"), py::arg("radius") = 0,
        R"pbdoc(As min_distance with a float16 bank passed as its uint16 bit pattern.)pbdoc");

  m.def(
      "kcenter_greedy",
      [](f32 x, int64_t k) {
        if (x.ndim() != 3 || k < 1 || k > x.shape(1))
          throw std::invalid_argument("x " + shape_str(x) + " must be [L,N,D] with 1 <= k <= N");
        const auto L = x.shape(0), N = x.shape(1), D = x.shape(2);
        dinopatch::checked_size({L, N, D}, "L * N * D");
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

  m.def(
      "isas",
      [] {
        int n = 0;
        const char* const* names = dinopatch::supported_isas(&n);
        return std::vector<std::string>(names, names + n);
      },
      R"pbdoc(Instruction sets this CPU and build support, best first.)pbdoc");
  m.def(
      "isa", [] { return std::string(dinopatch::active_isa().name); },
      R"pbdoc(The instruction set in use.)pbdoc");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (!dinopatch::set_isa(name.c_str()))
          throw std::invalid_argument("instruction set '" + name + "' is not supported here");
      },
      py::arg("name"), R"pbdoc(Use one of isas() (tests compare them all).)pbdoc");

#ifdef VERSION_INFO
  m.attr("__version__") = MACRO_STRINGIFY(VERSION_INFO);
#else
  m.attr("__version__") = "dev";
#endif
}
