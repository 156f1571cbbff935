// CUDA kernels of dinopatch._C_cuda (cuda_kernels.cu), called from
// cuda_bindings.cpp.  Pointers are device pointers; shapes are checked in
// Python and in the bindings.  Errors throw std::runtime_error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace dinopatch::cuda {

int device_count();

// out[b, l] as in min_distance_cpu (kernels.h); bank is float or the bit
// pattern of IEEE half when f16.  counts and radii (a device radius per
// location, or null: `radius` everywhere) may be null.
void min_distance(const float* queries, const void* bank, bool f16, const int64_t* counts,
                  float* out, int64_t B, int64_t L, int64_t K, int64_t D, int64_t h, int64_t w,
                  int64_t radius, const int32_t* radii);

// out[l, j] greedy k-center indices; scratch holds L * N floats.
void kcenter_greedy(const float* x, int64_t* out, float* scratch, int64_t L, int64_t N,
                    int64_t D, int64_t k);

// The calling thread's current device (where alloc allocates).
int current_device();
// The device's name, e.g. "NVIDIA H200".
std::string device_name(int device);
// Whether p points to device (or managed) memory this process can use.
bool is_device_pointer(const void* p);

// Events on the default stream, for timing kernels without the host's view.
void* event_create();
void event_destroy(void* e);
void event_record(void* e);
// Milliseconds from start to stop; waits for stop.
float event_elapsed_ms(void* start, void* stop);

void* alloc(size_t bytes);
void release(void* p);
void to_device(void* dst, const void* src, size_t bytes);
void to_host(void* dst, const void* src, size_t bytes);
void device_to_device(void* dst, const void* src, size_t bytes);
void synchronize();

}  // namespace dinopatch::cuda
