// The memory layout of a DLPack tensor (https://dmlc.github.io/dlpack/latest/c_api.html), as
// the unversioned capsule "dltensor" (DLPack 0.x, what __dlpack__() gives without max_version)
// carries it.  Only read here: DeviceBank.min_distance_dlpack borrows the capsule for one call;
// the capsule keeps the producer's memory alive and frees it when Python collects it.
#pragma once
#include <cstdint>

namespace dinopatch::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kCUDAManaged = 13 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;  // the allocation's start: the first element is at data + byte_offset
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

}  // namespace dinopatch::dlpack
