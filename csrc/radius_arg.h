// The radius argument of the bindings: one integer (the same tolerance at every
// location) or an integer array of L values (a tolerance map, radius per location).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "size_checks.h"

namespace dinopatch {

struct Radius {
  int64_t scalar = 0;        // the radius everywhere, or the largest of the map
  std::vector<int32_t> map;  // empty: `scalar` everywhere
  const int32_t* data() const { return map.empty() ? nullptr : map.data(); }
};

// Checked against grid h x w of L locations; values are clamped as grid_radius
// clamps one radius (beyond the grid every location is a neighbour already).
inline Radius parse_radius(const pybind11::object& radius, int64_t h, int64_t w, int64_t L) {
  namespace py = pybind11;
  Radius r;
  if (!py::isinstance<py::array>(radius)) {
    r.scalar = grid_radius(h, w, L, radius.cast<int64_t>());
    return r;
  }
  const auto a = radius.cast<py::array>();
  const char kind = a.dtype().kind();
  if (a.ndim() != 1 || a.shape(0) != L || (kind != 'i' && kind != 'u'))
    throw std::invalid_argument("a radius map must be an integer array of shape (L,) = (" +
                                std::to_string(L) + ",)");
  const auto v = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  grid_radius(h, w, L, 0);
  const int64_t cap = std::max(h, w);
  r.map.resize(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    const int64_t x = v.at(i);
    if (x < 0) throw std::invalid_argument("a radius map must hold values >= 0");
    r.map[i] = static_cast<int32_t>(std::min(x, cap));
    r.scalar = std::max<int64_t>(r.scalar, r.map[i]);
  }
  return r;
}

}  // namespace dinopatch
