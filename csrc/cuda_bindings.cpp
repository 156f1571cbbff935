// dinopatch._C_cuda: the CUDA kernels behind dinopatch.kernels' "cuda" backend.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"
#include "dlpack_view.h"
#include "radius_arg.h"
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

// Device memory held by Python, for callers that keep queries on the GPU.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t nbytes) : nbytes_(nbytes), buf_(nbytes) {}
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(buf_.p); }
  size_t nbytes() const { return nbytes_; }
  void copy_from_host(const py::array& a) {
    same_size(a);
    dc::to_device(buf_.p, a.data(), nbytes_);
  }
  void copy_to_host(py::array& a) {
    same_size(a);
    if (!a.writeable()) throw std::invalid_argument("the host array is read-only");
    dc::to_host(a.mutable_data(), buf_.p, nbytes_);
  }
  void copy_from_device(const DeviceBuffer& src) {
    if (src.nbytes_ != nbytes_) throw std::invalid_argument("buffers differ in size");
    dc::device_to_device(buf_.p, src.buf_.p, nbytes_);
  }

 private:
  void same_size(const py::array& a) const {
    if (!(a.flags() & py::array::c_style) || static_cast<size_t>(a.nbytes()) != nbytes_)
      throw std::invalid_argument("the host array must be C-contiguous with " +
                                  std::to_string(nbytes_) + " bytes, got " +
                                  std::to_string(a.nbytes()));
  }
  size_t nbytes_;
  Buffer buf_;
};

// A CUDA event that frees itself.
struct Event {
  void* e = dc::event_create();
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() { dc::event_destroy(e); }
};

// Times what a Python callable enqueues on the default stream, by events.
class EventTimer {
 public:
  float time(const py::function& fn) {
    dc::event_record(start_.e);
    fn();
    dc::event_record(stop_.e);
    return dc::event_elapsed_ms(start_.e, stop_.e);
  }

 private:
  Event start_, stop_;
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

// A bank uploaded once and queried many times (dinopatch.kernels.upload; a
// MemoryBank keeps one).  The device memory is freed with the object.
class DeviceBank {
 public:
  DeviceBank(py::array bank, bool f16, py::object counts)
      : device_(dc::current_device()),
        L_(checked(bank, f16).shape(0)),
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

  f32 min_distance(f32 queries, int64_t h, int64_t w, py::object radius) {
    if (queries.ndim() != 3 || queries.shape(1) != L_ || queries.shape(2) != D_)
      throw std::invalid_argument("queries must be [B,L,D] matching the bank's L and D");
    const dinopatch::Radius r = dinopatch::parse_radius(radius, h, w, L_);
    const int64_t B = queries.shape(0);
    dinopatch::checked_size({B, L_, D_, sizeof(float)}, "B * L * D bytes");
    f32 out({B, static_cast<int64_t>(L_)});
    if (B == 0) return out;
    const float* qh = queries.data();
    float* oh = out.mutable_data();
    {
      py::gil_scoped_release release;
      Buffer q(queries.nbytes());
      dc::to_device(q.p, qh, queries.nbytes());
      run_to_host(static_cast<const float*>(q.p), oh, B, h, w, r);
    }
    return out;
  }

  // Queries already in CUDA memory, handed over as a DLPack capsule: read in place, no host
  // copy.  The producer was asked (__dlpack__(stream=1)) to order its writes before the legacy
  // default stream, where the kernel runs; the result's copy to the host waits for the kernel,
  // so the queries are no longer read when this returns and the caller may free them.
  f32 min_distance_dlpack(const py::capsule& capsule, int64_t h, int64_t w, py::object radius) {
    auto* managed =
        static_cast<const dinopatch::dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed == nullptr) {
      PyErr_Clear();
      throw std::invalid_argument("queries must be an unused DLPack capsule named 'dltensor'");
    }
    const dinopatch::dlpack::Tensor& t = managed->dl_tensor;
    namespace dl = dinopatch::dlpack;
    if (t.device.device_type != dl::kCUDA && t.device.device_type != dl::kCUDAManaged)
      throw std::invalid_argument("queries are not in CUDA memory (DLPack device type " +
                                  std::to_string(t.device.device_type) + ")");
    if (t.device.device_id != device_)
      throw std::invalid_argument("queries are on CUDA device " + std::to_string(t.device.device_id) +
                                  ", the bank on device " + std::to_string(device_));
    if (t.dtype.code != dl::kFloat || t.dtype.bits != 32 || t.dtype.lanes != 1)
      throw std::invalid_argument("queries on the GPU must be float32 (code 2, 32 bits, 1 lane), got code " +
                                  std::to_string(t.dtype.code) + ", " + std::to_string(t.dtype.bits) +
                                  " bits, " + std::to_string(t.dtype.lanes) + " lanes");
    if (t.ndim != 3 || t.shape[0] < 0 || t.shape[1] != L_ || t.shape[2] != D_)
      throw std::invalid_argument("queries must be [B,L,D] matching the bank's L and D");
    if (t.strides != nullptr) {
      int64_t step = 1;  // row-major; the stride of a dimension of size 1 is never used
      for (int i = 2; i >= 0; --i) {
        if (t.shape[i] != 1 && t.strides[i] != step)
          throw std::invalid_argument("queries on the GPU must be C-contiguous (tensor.contiguous())");
        step *= t.shape[i];
      }
    }
    const dinopatch::Radius r = dinopatch::parse_radius(radius, h, w, L_);
    const int64_t B = t.shape[0];
    dinopatch::checked_size({B, L_, D_, sizeof(float)}, "B * L * D bytes");
    f32 out({B, static_cast<int64_t>(L_)});
    if (B == 0) return out;
    const auto* q = reinterpret_cast<const float*>(static_cast<const char*>(t.data) + t.byte_offset);
    if (reinterpret_cast<uintptr_t>(q) % alignof(float) != 0 || !dc::is_device_pointer(q))
      throw std::invalid_argument("queries' data is not an aligned device pointer");
    float* oh = out.mutable_data();
    {
      py::gil_scoped_release release;
      run_to_host(q, oh, B, h, w, r);
    }
    return out;
  }

  // Queries already on the device: no host copies, no allocation; launched on
  // the default stream and not waited for.
  void min_distance_device(uintptr_t queries, uintptr_t out, int64_t B, int64_t h, int64_t w,
                           int64_t radius) {
    if (h < 1 || w < 1 || h * w != L_ || radius < 0 || B < 0)
      throw std::invalid_argument("grid h x w must equal L, radius be >= 0 and the batch >= 0");
    if (B == 0) return;
    const void* q = reinterpret_cast<const void*>(queries);
    void* o = reinterpret_cast<void*>(out);
    if (!dc::is_device_pointer(q) || !dc::is_device_pointer(o))
      throw std::invalid_argument(
          "queries and out must be device pointers (DeviceBuffer.ptr, or data_ptr() of a CUDA "
          "tensor)");
    dc::min_distance(static_cast<const float*>(q), bank_.p, f16_,
                     has_counts_ ? static_cast<const int64_t*>(counts_.p) : nullptr,
                     static_cast<float*>(o), B, L_, K_, D_, h, w, radius, nullptr);
  }

  size_t nbytes() const { return static_cast<size_t>(L_ * K_ * D_ * (f16_ ? 2 : 4)); }
  int device() const { return device_; }
  py::tuple shape() const { return py::make_tuple(L_, K_, D_); }
  bool f16() const { return f16_; }

 private:
  // Device queries [B, L, D] -> host out [B, L]; the copy back waits for the kernel.  A radius
  // map (L int32) is copied to the device for the call.
  void run_to_host(const float* queries, float* out, int64_t B, int64_t h, int64_t w,
                   const dinopatch::Radius& r) {
    Buffer o(B * L_ * sizeof(float)), radii(r.map.size() * sizeof(int32_t));
    if (!r.map.empty()) dc::to_device(radii.p, r.map.data(), r.map.size() * sizeof(int32_t));
    dc::min_distance(queries, bank_.p, f16_, has_counts_ ? static_cast<const int64_t*>(counts_.p) : nullptr,
                     static_cast<float*>(o.p), B, L_, K_, D_, h, w, r.scalar,
                     r.map.empty() ? nullptr : static_cast<const int32_t*>(radii.p));
    dc::to_host(out, o.p, B * L_ * sizeof(float));
  }

  int device_;
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
           py::arg("w"), py::arg("radius") = 0,
           R"pbdoc(Host queries [B,L,D] f32 -> host [B,L] f32; copies both ways, synchronous.
radius: an int, or an [L] integer array (a radius per location).)pbdoc")
      .def("min_distance_device", &DeviceBank::min_distance_device, py::arg("queries_ptr"),
           py::arg("out_ptr"), py::arg("batch"), py::arg("h"), py::arg("w"), py::arg("radius") = 0,
           R"pbdoc(Device queries [batch,L,D] f32 at queries_ptr -> device [batch,L] f32 at out_ptr.
Launched on the default stream without waiting: synchronize() (or an event) before reading out.
The caller guarantees the sizes; both pointers must be device memory.)pbdoc")
      .def("min_distance_dlpack", &DeviceBank::min_distance_dlpack, py::arg("queries"), py::arg("h"),
           py::arg("w"), py::arg("radius") = 0,
           R"pbdoc(CUDA queries [B,L,D] f32 as a DLPack capsule (q.__dlpack__(stream=1)) -> host [B,L] f32.
Read in place on the bank's device, no host copy of the queries; shape, strides (C-contiguous),
dtype and device are checked.  Synchronous: the capsule may be dropped when it returns.)pbdoc")
      .def_property_readonly("nbytes", &DeviceBank::nbytes)
      .def_property_readonly("device", &DeviceBank::device, "The CUDA device the bank lives on.")
      .def_property_readonly("shape", &DeviceBank::shape, "(L, K, D) of the uploaded bank.")
      .def_property_readonly("f16", &DeviceBank::f16, "Whether the rows are stored as float16.");

  m.def(
      "min_distance",
      [](f32 queries, py::array bank, py::object counts, int64_t h, int64_t w, py::object radius,
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
  m.def("synchronize", &dc::synchronize, "Wait for the device; kernel errors surface here.");
  m.def("device_name", &dc::device_name, py::arg("device") = 0);

  py::class_<DeviceBuffer>(m, "DeviceBuffer", "Device memory of nbytes, freed with the object.")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def_property_readonly("ptr", &DeviceBuffer::ptr)
      .def_property_readonly("nbytes", &DeviceBuffer::nbytes)
      .def("copy_from_host", &DeviceBuffer::copy_from_host, py::arg("array"))
      .def("copy_to_host", &DeviceBuffer::copy_to_host, py::arg("array"))
      .def("copy_from_device", &DeviceBuffer::copy_from_device, py::arg("src"),
           "Device-to-device copy of a buffer of the same size.");

  py::class_<EventTimer>(m, "EventTimer", "CUDA events around what a callable enqueues.")
      .def(py::init<>())
      .def("time", &EventTimer::time, py::arg("fn"),
           "Milliseconds on the device between events recorded before and after fn().");
}
