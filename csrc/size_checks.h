// Size arithmetic on numbers a Python caller chose: products that would wrap
// around int64 are refused (std::invalid_argument, a ValueError in Python), so a
// grid whose h * w wraps to L cannot send a kernel walking past the bank.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

namespace dinopatch {

// a * b for non-negative sizes; throws when the product does not fit int64.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  if (a < 0 || b < 0 || (a != 0 && b > std::numeric_limits<int64_t>::max() / a))
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(a) + " * " +
                                std::to_string(b) + " overflows int64 or is negative");
  return a * b;
}

// The product of sizes, every step checked.
inline int64_t checked_size(std::initializer_list<int64_t> sizes, const char* what) {
  int64_t n = 1;
  for (const int64_t s : sizes) n = checked_mul(n, s, what);
  return n;
}

// The radius a kernel gets, after checking grid h x w against L locations.
// Beyond the grid every location is already a neighbour; clamping there keeps
// the kernels' y + radius from overflowing, so a huge radius means "all".
inline int64_t grid_radius(int64_t h, int64_t w, int64_t L, int64_t radius) {
  if (h < 1 || w < 1 || radius < 0 || checked_mul(h, w, "grid h * w") != L)
    throw std::invalid_argument("grid (" + std::to_string(h) + ", " + std::to_string(w) +
                                ") / radius " + std::to_string(radius) + " do not fit L = " +
                                std::to_string(L));
  return std::min(radius, std::max(h, w));
}

}  // namespace dinopatch
