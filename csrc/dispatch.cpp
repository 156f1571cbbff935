// Run-time choice of the instruction set: the best the CPU reports, unless
// set_isa() picks a lower one (tests run every ISA the machine has).
#include <atomic>
#include <cstring>

#include "kernels.h"

namespace dinopatch {

namespace {

struct Entry {
  const char* name;
  const IsaKernels* (*table)();
  bool (*cpu_has)();
};

#ifdef DINOPATCH_X86_ISAS
// isa_avx512.cpp is compiled with -mavx512bw/vl/dq as well (256-bit lanes
// with AVX-512 encodings), so all four are required.
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#ifdef DINOPATCH_BF16
bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const Entry kAll[] = {
#ifdef DINOPATCH_BF16
    {"avx512bf16", isa_avx512bf16, has_avx512bf16},
#endif
#ifdef DINOPATCH_X86_ISAS
    {"avx512", isa_avx512, has_avx512},
    {"avx2", isa_avx2, has_avx2},
#endif
    {"generic", isa_generic, always},
};

struct Supported {
  const char* names[sizeof kAll / sizeof kAll[0]];
  int n = 0;
  Supported() {
    for (const Entry& e : kAll)
      if (e.cpu_has()) names[n++] = e.name;
  }
};

const Supported& supported() {
  static const Supported s;
  return s;
}

// Read by kernels running on many threads with the GIL released.
std::atomic<const IsaKernels*> g_active{nullptr};

}  // namespace

const char* const* supported_isas(int* n) {
  *n = supported().n;
  return supported().names;
}

bool set_isa(const char* name) {
  for (const Entry& e : kAll)
    if (std::strcmp(e.name, name) == 0 && e.cpu_has()) {
      g_active = e.table();
      return true;
    }
  return false;
}

const IsaKernels& active_isa() {
  if (g_active.load() == nullptr) set_isa(supported().names[0]);
  return *g_active.load();
}

}  // namespace dinopatch
