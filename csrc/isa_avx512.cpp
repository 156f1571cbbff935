// AVX-512 inner loops (compiled with -mavx512f/bw/vl/dq -mfma -mf16c; called
// only on CPUs that report all of them).
#include <immintrin.h>

#include "kernels.h"

namespace dinopatch {
namespace avx512 {

#include "avx512_defs.h"

constexpr const char* ISA_NAME = "avx512";
#include "simd_body.h"

const IsaKernels table = {ISA_NAME,   packed_size, scratch_size, pack,
                          min_sq_f32, min_sq_f16,  kcenter_one};

}  // namespace avx512

const IsaKernels* isa_avx512() { return &avx512::table; }

}  // namespace dinopatch
