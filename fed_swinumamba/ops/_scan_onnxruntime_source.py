"""C++ source of the selective scan as a compiled ONNX Runtime operator (built by ``native_scan``).

Appended to ``_scan_kernel_source.SOURCE`` and compiled with it into one shared library that ONNX Runtime loads
(``SessionOptions.register_custom_ops_library``): it calls the kernel's ``forward`` on ONNX Runtime's own
intra-op thread pool (``KernelContext_ParallelFor``), with no copy through Python. onnxruntime-extensions'
Python operators return their output as a Python list (``tolist()``): 0.9 s per call at a 512 x 512 slice's
first stage, 5.7 of the full-size network's 8 s (benchmarks/RESULTS.md).

ONNX Runtime's C API is a table of function pointers whose order is frozen (entries are only ever appended);
the pip wheel ships no header, so the few entries used are declared here by their position in ``OrtApi``, and
``OrtCustomOp`` by its layout (op version 17: ``KernelComputeV2`` to return errors, ``ParallelFor`` in the API).
"""

SOURCE = r"""
#include <exception>
#include <stdexcept>
#include <string>

extern "C" {
struct OrtApi;
struct OrtStatus;
struct OrtValue;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtTensorTypeAndShapeInfo;
struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const OrtCustomOp*);
  int (*GetInputType)(const OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const OrtCustomOp*);
  int (*GetOutputType)(const OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp*, void*);
  int (*GetStartVersion)(const OrtCustomOp*);
  int (*GetEndVersion)(const OrtCustomOp*);
};
}

namespace {

constexpr uint32_t kOrtVersion = 17;  // the first with KernelContext_ParallelFor
constexpr int kFloat = 1, kRequired = 0, kDefaultMemory = 0, kFail = 1, kInvalidArgument = 2;
constexpr int64_t kMinTasks = 16;  // parallel tasks per call, so that a pool of any size stays busy
constexpr int64_t kChunk = 256;     // steps per saved state, as native_scan.CHUNK (inference reads none back)

// The OrtApi entries used, by their (frozen) position in the table.
class Api {
 public:
  explicit Api(const OrtApi* api) : table_(reinterpret_cast<void* const*>(api)) {}
  OrtStatus* status(int code, const std::string& message) const {
    return fn<OrtStatus* (*)(int, const char*)>(0)(code, message.c_str());
  }
  const char* message(OrtStatus* s) const { return fn<const char* (*)(OrtStatus*)>(2)(s); }
  void release(OrtStatus* s) const { fn<void (*)(OrtStatus*)>(93)(s); }
  OrtStatus* create_domain(const char* name, OrtCustomOpDomain** out) const {
    return fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(26)(name, out);
  }
  OrtStatus* domain_add(OrtCustomOpDomain* d, const OrtCustomOp* op) const {
    return fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(27)(d, op);
  }
  OrtStatus* add_domain(OrtSessionOptions* o, OrtCustomOpDomain* d) const {
    return fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(28)(o, d);
  }
  OrtStatus* data(const OrtValue* v, void** out) const {
    return fn<OrtStatus* (*)(const OrtValue*, void**)>(51)(v, out);
  }
  OrtStatus* type_and_shape(const OrtValue* v, OrtTensorTypeAndShapeInfo** out) const {
    return fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(65)(v, out);
  }
  OrtStatus* rank(const OrtTensorTypeAndShapeInfo* i, size_t* out) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(61)(i, out);
  }
  OrtStatus* dims(const OrtTensorTypeAndShapeInfo* i, int64_t* out, size_t n) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(62)(i, out, n);
  }
  void release(OrtTensorTypeAndShapeInfo* i) const { fn<void (*)(OrtTensorTypeAndShapeInfo*)>(99)(i); }
  OrtStatus* attribute(const OrtKernelInfo* i, const char* name, int64_t* out) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(86)(i, name, out);
  }
  OrtStatus* input(const OrtKernelContext* c, size_t index, const OrtValue** out) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(90)(c, index, out);
  }
  OrtStatus* output(OrtKernelContext* c, size_t index, const int64_t* dims, size_t n, OrtValue** out) const {
    return fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(91)(c, index, dims, n,
                                                                                                  out);
  }
  OrtStatus* parallel_for(const OrtKernelContext* c, void (*f)(void*, size_t), size_t total, void* data) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(274)(
        c, f, total, 0, data);
  }

 private:
  template <class F> F fn(int index) const { return reinterpret_cast<F>(table_[index]); }
  void* const* table_;
};

// A failed OrtApi call, carried out of the kernel as the status ONNX Runtime gave.
struct Failed {
  OrtStatus* status;
};
void check(OrtStatus* s) {
  if (s) throw Failed{s};
}

// The kernel's tasks on the session's intra-op thread pool (the calling thread takes part; returns when done).
struct OrtTasks {
  const Api& api;
  const OrtKernelContext* context;
  template <class Fn> void operator()(int64_t tasks, Fn&& task) const {
    using Task = std::remove_reference_t<Fn>;
    check(api.parallel_for(
        context, [](void* data, size_t i) { (*static_cast<Task*>(data))(int64_t(i)); }, size_t(tasks), &task));
  }
};

struct Tensor {
  const float* data;
  std::vector<int64_t> shape;
};

Tensor input(const Api& api, const OrtKernelContext* context, size_t index) {
  const OrtValue* value;
  check(api.input(context, index, &value));
  OrtTensorTypeAndShapeInfo* info;
  check(api.type_and_shape(value, &info));
  size_t rank;
  Tensor t;
  OrtStatus* s = api.rank(info, &rank);
  if (!s) t.shape.resize(rank), s = api.dims(info, t.shape.data(), rank);
  api.release(info);
  check(s);
  void* data;
  check(api.data(value, &data));
  t.data = static_cast<const float*>(data);
  return t;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + ")";
}

struct ScanKernel {
  Api api;
  bool softplus;

  // y (b, d, l) from u, delta (b, d, l), A (d, n), B, C (b, g, n, l), D, delta_bias (d): ``selective_scan``.
  void compute(OrtKernelContext* context) const {
    const char* names[] = {"u", "delta", "A", "B", "C", "D", "delta_bias"};
    std::vector<Tensor> in;
    for (size_t i = 0; i < 7; ++i) in.push_back(input(api, context, i));
    const auto& u = in[0].shape;
    const bool ranks = u.size() == 3 && in[1].shape == u && in[2].shape.size() == 2 && in[3].shape.size() == 4;
    const int64_t b = ranks ? u[0] : 0, d = ranks ? u[1] : 0, l = ranks ? u[2] : 0;
    const int64_t n = ranks ? in[2].shape[1] : 0, g = ranks ? in[3].shape[1] : 0;
    const std::vector<int64_t> expected[] = {{b, d, l}, {b, d, l}, {d, n}, {b, g, n, l}, {b, g, n, l}, {d}, {d}};
    for (size_t i = 0; i < 7; ++i)
      if (!ranks || in[i].shape != expected[i] || g < 1 || d % g || n > kMaxState)
        throw std::invalid_argument("SelectiveScan: input " + std::string(names[i]) + " has shape " +
                                    shape_text(in[i].shape) + "; expected u, delta (b, d, l), A (d, n <= " +
                                    std::to_string(kMaxState) + "), B, C (b, g, n, l) with g dividing d, D, " +
                                    "delta_bias (d)");
    // The kernel's layouts: A (d, n'), B and C (b, g, l, n'), n' = n rounded up to whole vectors, zero-padded.
    const int64_t padded = (n + 3) / 4 * 4;
    std::vector<float> A(d * padded, 0.f), B(b * g * l * padded, 0.f), C(B.size(), 0.f);
    for (int64_t c = 0; c < d; ++c) std::copy_n(in[2].data + c * n, n, A.data() + c * padded);
    for (int64_t plane = 0; plane < b * g; ++plane)
      for (int64_t k = 0; k < n; ++k)
        for (int64_t t = 0; t < l; ++t) {
          B[(plane * l + t) * padded + k] = in[3].data[(plane * n + k) * l + t];
          C[(plane * l + t) * padded + k] = in[4].data[(plane * n + k) * l + t];
        }
    const Shape s{b, d, padded, l, g, kChunk, softplus};
    const int64_t slices = std::max<int64_t>(1, std::min(d / g, (kMinTasks + b * g - 1) / (b * g)));
    std::vector<float> states(s.chunks() * b * d * padded);
    OrtValue* output;
    check(api.output(context, 0, u.data(), u.size(), &output));
    void* y;
    check(api.data(output, &y));
    dispatch(A.data(), d, padded, softplus, [&](auto N, auto decays) {
      forward<float, decltype(N)::value, decltype(decays)::value>(
          in[0].data, in[1].data, A.data(), B.data(), C.data(), in[5].data, in[6].data, static_cast<float*>(y),
          states.data(), s, slices, OrtTasks{api, context});
    });
  }
};

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* ort, const OrtKernelInfo* info, void** kernel) {
  const Api api(ort);
  int64_t softplus = 0;
  if (OrtStatus* s = api.attribute(info, "delta_softplus", &softplus)) return s;
  *kernel = new ScanKernel{api, softplus != 0};
  return nullptr;
}

OrtStatus* compute_kernel(void* kernel, OrtKernelContext* context) {
  const auto& k = *static_cast<const ScanKernel*>(kernel);
  try {
    k.compute(context);
    return nullptr;
  } catch (const Failed& f) {
    return f.status;
  } catch (const std::invalid_argument& e) {
    return k.api.status(kInvalidArgument, e.what());
  } catch (const std::exception& e) {
    return k.api.status(kFail, std::string("SelectiveScan: ") + e.what());
  }
}

OrtCustomOp make_op() {
  OrtCustomOp op{};
  op.version = kOrtVersion;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.KernelDestroy = [](void* kernel) { delete static_cast<ScanKernel*>(kernel); };
  op.GetName = [](const OrtCustomOp*) { return "SelectiveScan"; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return kFloat; };
  op.GetInputTypeCount = [](const OrtCustomOp*) { return size_t(7); };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t(1); };
  op.GetInputCharacteristic = op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return kRequired; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return kDefaultMemory; };
  op.GetVariadicInputMinArity = op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  return op;
}

const OrtCustomOp kScanOp = make_op();

}  // namespace

// ONNX Runtime's entry point: the operator in domain ai.onnx.contrib, added to the session's options. The domain
// lives as long as the process (ONNX Runtime needs it as long as any session made with these options).
extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* base) {
  const OrtApi* ort = base->GetApi(kOrtVersion);
  if (!ort)
    return Api(base->GetApi(1)).status(kFail, std::string("the compiled SelectiveScan needs ONNX Runtime 1.17 or "
                                                          "later; this is ") + base->GetVersionString());
  const Api api(ort);
  OrtCustomOpDomain* domain;
  if (OrtStatus* s = api.create_domain("ai.onnx.contrib", &domain)) return s;
  if (OrtStatus* s = api.domain_add(domain, &kScanOp)) return s;
  return api.add_domain(options, domain);
}
"""
