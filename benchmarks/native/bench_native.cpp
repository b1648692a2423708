// Times one model from C++ without Python: an AOTInductor package (torch::inductor::AOTIModelPackageLoader) or a
// TorchScript file (torch::jit::load, libtorch eager). Prints one JSON line: per-call p50/p99 in microseconds, the
// number of calls, and the peak resident memory the load and the calls added.
//
//   bench_native aoti|ts|ts-grad MODEL THREADS SECONDS INPUT.f32 OUTPUT.f32 DIM...
//
// The input is read from INPUT.f32 (raw little-endian float32, C order, shape DIM...) and every call runs on it;
// the first output of the last call is written to OUTPUT.f32, so the caller can check it against Python eager.
// ts-grad runs TorchScript with autograd on (a model that computes forces as -dE/dx needs it); aoti and ts run
// under c10::InferenceMode, as a simulation calling a surrogate would.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace {

// A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak since the last reset).
long status_kib(const std::string &field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
  return -1;
}

// Writing 5 to clear_refs resets VmHWM to the current RSS, so the peak measured later is this harness's own.
void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

int main(int argc, char **argv) {
  if (argc < 8) {
    std::cerr << "usage: bench_native aoti|ts|ts-grad MODEL THREADS SECONDS INPUT.f32 OUTPUT.f32 DIM...\n";
    return 2;
  }
  const std::string kind = argv[1], path = argv[2], in_path = argv[5], out_path = argv[6];
  const int threads = std::stoi(argv[3]);
  const double seconds = std::stod(argv[4]);
  std::vector<int64_t> shape;
  for (int i = 7; i < argc; ++i) shape.push_back(std::stoll(argv[i]));
  at::set_num_threads(threads);

  at::Tensor x = torch::empty(shape, torch::kFloat32);
  {
    std::ifstream in(in_path, std::ios::binary);
    in.read(reinterpret_cast<char *>(x.data_ptr<float>()), static_cast<std::streamsize>(x.nbytes()));
    if (!in) {
      std::cerr << "bench_native: cannot read " << x.nbytes() << " bytes from " << in_path << "\n";
      return 2;
    }
  }
  reset_peak();
  const long rss0 = status_kib("VmRSS");

  std::function<at::Tensor()> call;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> aoti;
  torch::jit::Module ts;
  std::vector<at::Tensor> aoti_inputs{x};
  std::vector<torch::jit::IValue> ts_inputs{x};
  try {
    if (kind == "aoti") {
      aoti = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
      call = [&] { return aoti->run(aoti_inputs)[0]; };
    } else if (kind == "ts" || kind == "ts-grad") {
      ts = torch::jit::load(path);
      ts.eval();
      call = [&] {
        auto out = ts.forward(ts_inputs);
        return out.isTuple() ? out.toTupleRef().elements()[0].toTensor() : out.toTensor();
      };
    } else {
      std::cerr << "bench_native: unknown kind " << kind << " (aoti, ts or ts-grad)\n";
      return 2;
    }
  } catch (const std::exception &e) {
    std::cerr << "bench_native: cannot load " << path << ": " << e.what() << "\n";
    return 1;
  }

  std::vector<double> us;
  at::Tensor y;
  {
    std::unique_ptr<c10::InferenceMode> guard;
    if (kind != "ts-grad") guard = std::make_unique<c10::InferenceMode>();
    using clock = std::chrono::steady_clock;
    const auto warm_end = clock::now() + std::chrono::duration<double>(std::min(0.2, seconds / 5));
    for (int i = 0; i < 5 || clock::now() < warm_end; ++i) y = call();
    const auto end = clock::now() + std::chrono::duration<double>(seconds);
    us.reserve(1 << 16);
    while (us.size() < 20 || (clock::now() < end && us.size() < 2000000)) {
      const auto t0 = clock::now();
      y = call();
      us.push_back(std::chrono::duration<double, std::micro>(clock::now() - t0).count());
    }
  }
  y = y.contiguous().to(torch::kFloat32);
  std::ofstream(out_path, std::ios::binary)
      .write(reinterpret_cast<const char *>(y.data_ptr<float>()), static_cast<std::streamsize>(y.nbytes()));
  double total = 0;
  for (double t : us) total += t;
  std::printf("{\"p50_us\": %.4f, \"p99_us\": %.4f, \"mean_us\": %.4f, \"calls\": %zu, \"peak_rss_growth_mib\": %.2f}\n",
              percentile(us, 0.5), percentile(us, 0.99), total / static_cast<double>(us.size()), us.size(),
              static_cast<double>(status_kib("VmHWM") - rss0) / 1024.0);
  return 0;
}
