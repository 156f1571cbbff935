// Portable inner loops for CPUs without AVX2 (and non-x86 builds).
#include <cstring>

#include "kernels.h"

namespace dinopatch {
namespace generic {

using V = float;
constexpr int W = 1;
constexpr int QB = 2, RB = 4;
constexpr const char* ISA_NAME = "generic";
inline V zero() { return 0.f; }
inline V load(const float* p) { return *p; }
inline float to_float(uint16_t h) {
  // IEEE half -> float, subnormals and inf/NaN included.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400)) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline V load(const uint16_t* p) { return to_float(*p); }
inline void store(float* p, V a) { *p = a; }
inline V sub(V a, V b) { return a - b; }
inline V fma(V a, V b, V c) { return a * b + c; }
inline float hsum(V a) { return a; }

// One query per "vector"; 4 rows for independent sums.
struct Full {
  using V = float;
  static constexpr int W = 1, RB = 4;
  static V zero() { return 0.f; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V a) { *p = a; }
  static V bsub(V a, float x) { return a - x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V min(V a, V b) { return b < a ? b : a; }
  static V add(V a, V b) { return a + b; }
};
using Half = Full;

#include "simd_body.h"

const IsaKernels table = {ISA_NAME,   packed_size, scratch_size, pack,
                          min_sq_f32, min_sq_f16,  kcenter_one};

}  // namespace generic

const IsaKernels* isa_generic() { return &generic::table; }

}  // namespace dinopatch
