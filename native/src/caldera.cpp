// The C ABI of native/include/caldera.h over libtorch: AOTInductor packages (.pt2) through the model container the
// package's shared library exports, TorchScript (.ts) through torch::jit. Every C++ exception stops here and becomes
// a status plus a thread-local message: a simulation that passes a wrong shape must be able to go on.
#include "caldera.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace fs = std::filesystem;
using torch::inductor::AOTIModelContainerRunner;

namespace {

thread_local std::string last_error;

// A failure with the status the caller gets; anything else thrown inside becomes the call's default status.
struct Failure {
  caldera_status status;
  std::string message;
};

[[noreturn]] void fail(caldera_status status, std::string message) { throw Failure{status, std::move(message)}; }

template <class F>
caldera_status guarded(caldera_status otherwise, F&& body) {
  try {
    body();
    return CALDERA_OK;
  } catch (const Failure& e) {
    last_error = e.message;
    return e.status;
  } catch (const c10::Error& e) {
    last_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  // torch's messages can span lines; the caller gets one.
  for (char& c : last_error) c = c == '\n' ? ' ' : c;
  return otherwise;
}

const char* dtype_name(at::ScalarType t) { return t == at::kFloat ? "float32" : t == at::kDouble ? "float64" : "other"; }

std::optional<at::ScalarType> scalar_type(int dtype) {
  if (dtype == CALDERA_FLOAT32) return at::kFloat;
  if (dtype == CALDERA_FLOAT64) return at::kDouble;
  return std::nullopt;
}

std::string shape_text(const int64_t* shape, int ndim) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < ndim; ++i) s << (i ? "," : "") << shape[i];
  s << ")";
  return s.str();
}

// One input or output as the package metadata records it: "name:dtype:d0,d1,..." with -1 for a dynamic dimension.
struct Spec {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
};

std::vector<Spec> parse_specs(const std::string& text, const std::string& key) {
  std::vector<Spec> specs;
  std::stringstream items(text);
  std::string item;
  while (std::getline(items, item, ';')) {
    if (item.empty()) continue;
    auto a = item.find(':'), b = item.rfind(':');
    if (a == std::string::npos || a == b) fail(CALDERA_ERR_LOAD, "package metadata " + key + " entry '" + item +
                                                                  "' is not name:dtype:shape");
    Spec spec;
    spec.name = item.substr(0, a);
    std::string dtype = item.substr(a + 1, b - a - 1);
    if (dtype == "float32") spec.dtype = at::kFloat;
    else if (dtype == "float64") spec.dtype = at::kDouble;
    else fail(CALDERA_ERR_LOAD, "package metadata " + key + " has dtype '" + dtype + "': caldera runs float32/float64");
    std::stringstream dims(item.substr(b + 1));
    std::string dim;
    while (std::getline(dims, dim, ',')) spec.shape.push_back(std::stoll(dim));
    if (spec.shape.size() > CALDERA_MAX_NDIM) fail(CALDERA_ERR_LOAD, "package metadata " + key + ": too many dims");
    specs.push_back(std::move(spec));
  }
  return specs;
}

// The model container and its run function live in protected members of the runner; a derived class may name
// them. Calling the container directly skips the runner's std::vector<at::Tensor> round trip on every call.
struct RunnerAccess : AOTIModelContainerRunner {
  static AOTInductorModelContainerHandle container(AOTIModelContainerRunner* r) {
    return r->*(&RunnerAccess::container_handle_);
  }
  static decltype(&AOTInductorModelContainerRun) run(AOTIModelContainerRunner* r) { return r->*(&RunnerAccess::run_func_); }
  static AOTIProxyExecutorHandle proxy(AOTIModelContainerRunner* r) { return r->*(&RunnerAccess::proxy_executor_handle_); }
  static decltype(&AOTInductorGetLastError) last_error(AOTIModelContainerRunner* r) {
    return r->*(&RunnerAccess::get_last_error_func_);
  }
  static decltype(&AOTInductorModelContainerGetNumOutputs) num_outputs(AOTIModelContainerRunner* r) {
    return r->*(&RunnerAccess::get_num_outputs_func_);
  }
};

// Owns the output handles the container hands back (also when a later check throws).
struct OutputHandles {
  AtenTensorHandle h[16] = {};
  ~OutputHandles() {
    for (auto t : h) delete reinterpret_cast<at::Tensor*>(t);
  }
  at::Tensor& operator[](size_t i) { return *reinterpret_cast<at::Tensor*>(h[i]); }
};

bool is_cuda_pointer(const void* p) {
  if (!at::hasCUDA()) return false;
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    if (hooks.isPinnedPtr(p)) return false;
    return hooks.getDeviceFromPtr(const_cast<void*>(p)).is_cuda();
  } catch (...) {
    return false;  // host memory the driver does not know: cudaPointerGetAttributes says so by failing
  }
}

}  // namespace

struct caldera_model {
  c10::Device device{c10::kCPU};
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  std::optional<torch::jit::script::Module> script;
  bool has_specs = false;
  std::vector<Spec> inputs, outputs;
  std::unordered_map<std::string, std::string> meta;  // the package metadata (caldera_metadata)
  int n_inputs = -1, n_outputs = -1;
  AOTInductorModelContainerHandle container = nullptr;
  decltype(&AOTInductorModelContainerRun) run_func = nullptr;
  decltype(&AOTInductorGetLastError) last_error_func = nullptr;
  AOTIProxyExecutorHandle proxy = nullptr;
  std::mutex mutex;  // the container is loaded single-threaded: one call at a time per handle
  at::Tensor wrapped[16];  // the last input arrays, wrapped (see wrap_input)
};

namespace {

c10::Device parse_device(const char* device) {
  std::string text = device ? device : "cpu";
  c10::Device d(c10::kCPU);
  try {
    d = c10::Device(text);
  } catch (const c10::Error&) {
    fail(CALDERA_ERR_ARG, "unknown device '" + text + "': use \"cpu\", \"cuda\" or \"cuda:N\"");
  }
  if (d.is_cpu()) return d;
  if (!d.is_cuda()) fail(CALDERA_ERR_ARG, "unsupported device '" + text + "': use \"cpu\", \"cuda\" or \"cuda:N\"");
  if (!torch::cuda::is_available())
    fail(CALDERA_ERR_DEVICE, "device '" + text + "' asked but this libtorch sees no CUDA device (a CPU-only build or "
                             "no GPU visible): load with device \"cpu\"");
  if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count()))
    fail(CALDERA_ERR_DEVICE, "device '" + text + "' asked but only " + std::to_string(torch::cuda::device_count()) +
                                 " CUDA device(s) are visible");
  if (!d.has_index()) d = c10::Device(c10::kCUDA, 0);
  return d;
}

// NAME@VERSION (VERSION: 3, v3, latest or a tag) in the registry at $CALDERA_REGISTRY (docs/registry.md): the
// version directory REGISTRY/NAME/vN, a tag being a text file REGISTRY/NAME/tags/TAG holding N. A version is
// complete only once its MANIFEST exists (it is written last, and removal takes it away first). The hashes are
// checked by the Python side (caldera models show); here only directory calls, no JSON.
fs::path registry_version(const std::string& ref) {
  const char* root = std::getenv("CALDERA_REGISTRY");
  if (!root || !*root)
    fail(CALDERA_ERR_LOAD,
         "no such file or directory: " + ref + " (for a registry model NAME@VERSION, set CALDERA_REGISTRY)");
  std::string name = ref.substr(0, ref.rfind('@')), which = ref.substr(ref.rfind('@') + 1);
  fs::path dir = fs::path(root) / name;
  if (name.empty() || !fs::is_directory(dir))
    fail(CALDERA_ERR_LOAD, "no model '" + name + "' in registry " + root + ": `caldera models list` shows them");
  auto number = [](const std::string& s) {
    std::string d = (!s.empty() && s[0] == 'v') ? s.substr(1) : s;
    return !d.empty() && d.find_first_not_of("0123456789") == std::string::npos ? std::stol(d) : -1L;
  };
  long n = -1;
  if (which.empty() || which == "latest") {
    for (const auto& e : fs::directory_iterator(dir)) {
      long k = e.path().filename().string()[0] == 'v' ? number(e.path().filename().string()) : -1;
      if (k > n && fs::exists(e.path() / "MANIFEST")) n = k;
    }
  } else if ((n = number(which)) < 0) {
    std::ifstream tag(dir / "tags" / which);
    std::string text;
    if (tag >> text) n = number(text);
  }
  fs::path version = dir / ("v" + std::to_string(n));
  if (n < 0 || !fs::exists(version / "MANIFEST"))
    fail(CALDERA_ERR_LOAD, name + " has no version '" + which + "' in registry " + root +
                               " (removed, or never published): `caldera models list " + name + "`");
  return version;
}

fs::path resolve(const std::string& given, const c10::Device& device) {
  fs::path p(given);
  if (!fs::exists(p) && given.find('@') != std::string::npos &&
      given.substr(0, given.rfind('@')).find('/') == std::string::npos)
    p = registry_version(given);
  const std::string path = p.string();
  if (!fs::exists(p)) fail(CALDERA_ERR_LOAD, "no such file or directory: " + path);
  if (fs::is_directory(p)) {
    const char* name = device.is_cuda() ? "model.aoti-cuda.pt2" : "model.aoti.pt2";
    if (!fs::exists(p / name))
      fail(device.is_cuda() ? CALDERA_ERR_DEVICE : CALDERA_ERR_LOAD,
           "no " + std::string(name) + " in " + path + ": run `caldera export RUN_DIR" +
               (device.is_cuda() ? " --device cuda" : "") + "` (format pt2) to make it");
    return p / name;
  }
  return p;
}

void load_package(caldera_model& m, const std::string& path) {
  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const std::exception& e) {
    fail(CALDERA_ERR_LOAD, "cannot read " + path + " as an AOTInductor package: " + e.what());
  }
  std::string built_for = meta.count("caldera.device") ? meta["caldera.device"] : meta["AOTI_DEVICE_KEY"];
  if (!built_for.empty() && c10::Device(built_for).type() != m.device.type())
    fail(CALDERA_ERR_DEVICE, path + " was compiled for " + built_for + " but device " + m.device.str() +
                                 " was asked: load it with \"" + built_for + "\" or export for " +
                                 c10::DeviceTypeName(m.device.type(), true) + " (caldera export --device)");
  try {
    m.package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, "model", /*run_single_threaded=*/true, /*num_runners=*/1, m.device.is_cuda() ? m.device.index() : -1);
  } catch (const std::exception& e) {
    fail(CALDERA_ERR_LOAD, "cannot load " + path + ": " + e.what());
  }
  AOTIModelContainerRunner* runner = m.package->get_runner();
  m.container = RunnerAccess::container(runner);
  m.run_func = RunnerAccess::run(runner);
  m.proxy = RunnerAccess::proxy(runner);
  m.last_error_func = RunnerAccess::last_error(runner);
  if (meta.count("caldera.inputs") && meta.count("caldera.outputs")) {
    m.inputs = parse_specs(meta["caldera.inputs"], "caldera.inputs");
    m.outputs = parse_specs(meta["caldera.outputs"], "caldera.outputs");
    m.has_specs = true;
    m.n_inputs = static_cast<int>(m.inputs.size());
  }
  m.meta = std::move(meta);
  size_t n_out = 0;
  auto num_outputs = RunnerAccess::num_outputs(runner);
  if (num_outputs && num_outputs(m.container, &n_out) == 0) m.n_outputs = static_cast<int>(n_out);
  else m.n_outputs = static_cast<int>(m.outputs.size());
  if (m.n_inputs > 16 || m.n_outputs > 16) fail(CALDERA_ERR_LOAD, path + ": caldera runs models of up to 16 inputs and outputs");
}

void load_script(caldera_model& m, const std::string& path) {
  try {
    m.script = torch::jit::load(path, m.device);
  } catch (const std::exception& e) {
    fail(CALDERA_ERR_LOAD, "cannot load " + path + " as TorchScript: " + e.what());
  }
  m.script->eval();
  // forward's schema lists self first.
  m.n_inputs = static_cast<int>(m.script->get_method("forward").function().getSchema().arguments().size()) - 1;
}

// Check a caller's array against the recorded spec (when there is one); return its torch dtype. The messages are
// built only on failure: this runs on every call of a microsecond model.
at::ScalarType check(const caldera_model& m, const char* what, int i, const std::vector<Spec>& specs,
                     const int64_t* shape, int ndim, int dtype) {
  auto t = scalar_type(dtype);
  auto which = [&] {
    std::string w = std::string(what) + " " + std::to_string(i);
    return m.has_specs && i < static_cast<int>(specs.size()) ? w + " '" + specs[i].name + "'" : w;
  };
  if (!t) fail(CALDERA_ERR_DTYPE, which() + " has dtype code " + std::to_string(dtype) +
                                      ": use CALDERA_FLOAT32 (0) or CALDERA_FLOAT64 (1)");
  if (ndim < 0 || ndim > CALDERA_MAX_NDIM || (ndim > 0 && !shape))
    fail(CALDERA_ERR_ARG, which() + " has ndim " + std::to_string(ndim) + " (0.." + std::to_string(CALDERA_MAX_NDIM) + ")");
  if (!m.has_specs || i >= static_cast<int>(specs.size())) return *t;
  const Spec& s = specs[i];
  if (*t != s.dtype)
    fail(CALDERA_ERR_DTYPE, which() + " is " + dtype_name(*t) + " but the model takes " + dtype_name(s.dtype) +
                                ": pass " + dtype_name(s.dtype) + " arrays (Fortran real" +
                                (s.dtype == at::kFloat ? "32" : "64") + ")");
  bool ok = ndim == static_cast<int>(s.shape.size());
  for (int d = 0; ok && d < ndim; ++d) ok = s.shape[d] < 0 ? shape[d] >= 1 : shape[d] == s.shape[d];
  if (!ok)
    fail(CALDERA_ERR_SHAPE, which() + " has C shape " + shape_text(shape, ndim) + " but the model expects " +
                                shape_text(s.shape.data(), static_cast<int>(s.shape.size())) +
                                " (-1 = any batch; a Fortran array passes the reversed shape)");
  return *t;
}

// Wrap a caller's input in place; a host array for a CUDA model is copied to the device.
at::Tensor wrap_input(caldera_model& m, int i, const void* x, const int64_t* shape, int ndim, at::ScalarType t) {
  auto sizes = c10::IntArrayRef(shape, ndim);
  // A simulation passes the same array every step: reuse the tensor that wraps it (two heap objects fewer per
  // call). It owns nothing, so a new array at a recycled address is still the right memory.
  if (m.device.is_cpu() && i < 16) {
    at::Tensor& cached = m.wrapped[i];
    if (cached.defined() && cached.const_data_ptr() == x && cached.scalar_type() == t && cached.sizes() == sizes)
      return cached;
    cached = at::from_blob(const_cast<void*>(x), sizes, at::TensorOptions().dtype(t));
    return cached;
  }
  if (m.device.is_cpu() || is_cuda_pointer(x))
    return at::from_blob(const_cast<void*>(x), sizes, at::TensorOptions().dtype(t).device(m.device));
  return at::from_blob(const_cast<void*>(x), sizes, at::TensorOptions().dtype(t)).to(m.device);
}

void write_output(const caldera_model& m, int i, const at::Tensor& out, void* y, const int64_t* shape, int ndim,
                  at::ScalarType t) {
  std::string which = "output " + std::to_string(i);
  if (out.scalar_type() != t)
    fail(CALDERA_ERR_DTYPE, which + " is " + dtype_name(out.scalar_type()) + " but the caller's array is " +
                                dtype_name(t) + ": pass a " + dtype_name(out.scalar_type()) + " array");
  bool ok = out.dim() == ndim;
  for (int d = 0; ok && d < ndim; ++d) ok = out.size(d) == shape[d];
  if (!ok)
    fail(CALDERA_ERR_SHAPE, which + " has C shape " + shape_text(out.sizes().data(), static_cast<int>(out.dim())) +
                                " but the caller's array is " + shape_text(shape, ndim));
  if (out.is_cpu() && out.is_contiguous()) {
    std::memcpy(y, out.data_ptr(), out.nbytes());
    return;
  }
  bool y_on_device = m.device.is_cuda() && is_cuda_pointer(y);
  auto opts = at::TensorOptions().dtype(t).device(y_on_device ? m.device : c10::Device(c10::kCPU));
  at::from_blob(y, out.sizes(), opts).copy_(out);
  // The caller reads y after we return, possibly from another stream: let the copy finish first.
  if (y_on_device) at::detail::getCUDAHooks().deviceSynchronize(m.device.index());
}

void run(caldera_model& m, int n_in, const void* const* xs, const int64_t* const* x_shapes, const int* x_ndims,
         const int* x_dtypes, int n_out, void* const* ys, const int64_t* const* y_shapes, const int* y_ndims,
         const int* y_dtypes) {
  if (n_in < 1 || n_out < 1 || !xs || !x_shapes || !x_ndims || !x_dtypes || !ys || !y_shapes || !y_ndims || !y_dtypes)
    fail(CALDERA_ERR_ARG, "caldera_run_n needs at least one input and one output, and no NULL array");
  if (m.n_inputs >= 0 && n_in != m.n_inputs)
    fail(CALDERA_ERR_ARG, std::to_string(n_in) + " input(s) given but the model takes " + std::to_string(m.n_inputs));
  if (m.n_outputs >= 0 && n_out > m.n_outputs)
    fail(CALDERA_ERR_ARG, std::to_string(n_out) + " output(s) asked but the model returns " + std::to_string(m.n_outputs));
  for (int i = 0; i < n_in; ++i)
    if (!xs[i]) fail(CALDERA_ERR_ARG, "input " + std::to_string(i) + " is NULL");
  for (int i = 0; i < n_out; ++i)
    if (!ys[i]) fail(CALDERA_ERR_ARG, "output " + std::to_string(i) + " is NULL");
  at::ScalarType in_types[16], out_types[16];
  if (n_in > 16 || n_out > 16) fail(CALDERA_ERR_ARG, "at most 16 inputs and 16 outputs");
  for (int i = 0; i < n_in; ++i) in_types[i] = check(m, "input", i, m.inputs, x_shapes[i], x_ndims[i], x_dtypes[i]);
  for (int i = 0; i < n_out; ++i)
    out_types[i] = check(m, "output", i, m.outputs, y_shapes[i], y_ndims[i], y_dtypes[i]);

  std::lock_guard<std::mutex> lock(m.mutex);
  if (m.package) {
    AtenTensorHandle in[16];
    for (int i = 0; i < n_in; ++i)
      in[i] = reinterpret_cast<AtenTensorHandle>(
          new at::Tensor(wrap_input(m, i, xs[i], x_shapes[i], x_ndims[i], in_types[i])));
    OutputHandles out;
    // The container steals (and frees) the input handles, also when it fails.
    if (m.run_func(m.container, in, static_cast<size_t>(n_in), out.h, static_cast<size_t>(m.n_outputs), nullptr,
                   m.proxy) != 0) {
      const char* why = nullptr;
      if (m.last_error_func) m.last_error_func(&why);
      fail(CALDERA_ERR_RUN, std::string("the model failed: ") + (why && *why ? why : "see stderr"));
    }
    for (int i = 0; i < n_out; ++i) write_output(m, i, out[i], ys[i], y_shapes[i], y_ndims[i], out_types[i]);
    return;
  }
  c10::InferenceMode inference;
  std::vector<c10::IValue> args;
  args.reserve(n_in);
  for (int i = 0; i < n_in; ++i) args.emplace_back(wrap_input(m, i, xs[i], x_shapes[i], x_ndims[i], in_types[i]));
  c10::IValue result;
  try {
    result = m.script->forward(args);
  } catch (const std::exception& e) {
    fail(CALDERA_ERR_RUN, std::string("the model failed: ") + e.what());
  }
  std::vector<at::Tensor> outs;
  if (result.isTensor()) outs.push_back(result.toTensor());
  else if (result.isTuple())
    for (const auto& v : result.toTupleRef().elements()) outs.push_back(v.toTensor());
  else if (result.isTensorList())
    for (const auto& t : result.toTensorVector()) outs.push_back(t);
  else fail(CALDERA_ERR_RUN, "the TorchScript model returned " + result.tagKind() + ", not tensors");
  if (n_out > static_cast<int>(outs.size()))
    fail(CALDERA_ERR_ARG, std::to_string(n_out) + " output(s) asked but the model returned " + std::to_string(outs.size()));
  for (int i = 0; i < n_out; ++i) write_output(m, i, outs[i], ys[i], y_shapes[i], y_ndims[i], out_types[i]);
}

}  // namespace

extern "C" {

caldera_status caldera_load(const char* path, const char* device, caldera_model** out) {
  return guarded(CALDERA_ERR_LOAD, [&] {
    if (!path || !out) fail(CALDERA_ERR_ARG, "caldera_load needs a path and a place for the model (not NULL)");
    *out = nullptr;
    auto m = std::make_unique<caldera_model>();
    m->device = parse_device(device);
    fs::path file = resolve(path, m->device);
    std::string ext = file.extension().string();
    if (ext == ".pt2") load_package(*m, file.string());
    else if (ext == ".ts" || ext == ".pt") load_script(*m, file.string());
    else fail(CALDERA_ERR_LOAD, file.string() + " is neither an AOTInductor package (.pt2) nor TorchScript (.ts)");
    *out = m.release();
  });
}

caldera_status caldera_run(caldera_model* m, const void* x, const int64_t* x_shape, int x_ndim, int x_dtype, void* y,
                           const int64_t* y_shape, int y_ndim, int y_dtype) {
  return guarded(CALDERA_ERR_RUN, [&] {
    if (!m) fail(CALDERA_ERR_ARG, "caldera_run got a NULL model: check caldera_load's status");
    run(*m, 1, &x, &x_shape, &x_ndim, &x_dtype, 1, &y, &y_shape, &y_ndim, &y_dtype);
  });
}

caldera_status caldera_run_n(caldera_model* m, int n_in, const void* const* xs, const int64_t* const* x_shapes,
                             const int* x_ndims, const int* x_dtypes, int n_out, void* const* ys,
                             const int64_t* const* y_shapes, const int* y_ndims, const int* y_dtypes) {
  return guarded(CALDERA_ERR_RUN, [&] {
    if (!m) fail(CALDERA_ERR_ARG, "caldera_run_n got a NULL model: check caldera_load's status");
    run(*m, n_in, xs, x_shapes, x_ndims, x_dtypes, n_out, ys, y_shapes, y_ndims, y_dtypes);
  });
}

int caldera_n_inputs(const caldera_model* m) { return m ? m->n_inputs : -1; }
int caldera_n_outputs(const caldera_model* m) { return m ? m->n_outputs : -1; }

static caldera_status shape_of(const caldera_model* m, const std::vector<Spec>* specs, const char* what, int i,
                               int64_t* shape, int* ndim) {
  return guarded(CALDERA_ERR_ARG, [&] {
    if (!m || !shape || !ndim) fail(CALDERA_ERR_ARG, std::string("caldera_") + what + "_shape got a NULL argument");
    if (!m->has_specs) fail(CALDERA_ERR_ARG, "this model records no shapes (TorchScript, or a package not made by "
                                             "caldera export)");
    if (i < 0 || i >= static_cast<int>(specs->size()))
      fail(CALDERA_ERR_ARG, std::string(what) + " " + std::to_string(i) + " out of range (the model has " +
                                std::to_string(specs->size()) + ")");
    const auto& s = (*specs)[i].shape;
    *ndim = static_cast<int>(s.size());
    std::copy(s.begin(), s.end(), shape);
  });
}

caldera_status caldera_input_shape(const caldera_model* m, int i, int64_t* shape, int* ndim) {
  return shape_of(m, m ? &m->inputs : nullptr, "input", i, shape, ndim);
}

caldera_status caldera_output_shape(const caldera_model* m, int i, int64_t* shape, int* ndim) {
  return shape_of(m, m ? &m->outputs : nullptr, "output", i, shape, ndim);
}

caldera_status caldera_metadata(const caldera_model* m, const char* key, char* buf, int64_t* len) {
  return guarded(CALDERA_ERR_ARG, [&] {
    if (!m || !key || !len) fail(CALDERA_ERR_ARG, "caldera_metadata needs a model, a key and a length (not NULL)");
    int64_t size = *len;
    auto found = m->meta.find(key);
    if (found == m->meta.end()) {
      *len = -1;
      fail(CALDERA_ERR_ARG, std::string("no metadata '") + key + "' in this model" +
                                (m->script ? " (TorchScript files carry none: load the .pt2 package)"
                                           : " (re-export it with this caldera: `caldera export RUN_DIR`)"));
    }
    const std::string& value = found->second;
    *len = static_cast<int64_t>(value.size());
    if (!buf || size < *len + 1)
      fail(CALDERA_ERR_ARG, std::string("metadata '") + key + "' has " + std::to_string(value.size()) +
                                " bytes: pass a buffer of at least " + std::to_string(value.size() + 1));
    std::memcpy(buf, value.c_str(), value.size() + 1);
  });
}

const char* caldera_last_error(void) { return last_error.c_str(); }

void caldera_free(caldera_model* m) {
  try {
    delete m;
  } catch (...) {
    // A destructor failing at shutdown must not abort the caller.
  }
}

}  // extern "C"
