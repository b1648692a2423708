// Per-call latency of a model through Caldera's C API and through the bare libtorch call it wraps
// (AOTIModelPackageLoader::run), same inputs, batch and thread count.
//   caldera_bench PACKAGE.pt2|EXPORT_DIR BATCH ITERATIONS [THREADS=1]   -> one JSON line (microseconds per call)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "caldera.hpp"

namespace {

struct Stats {
  double p50, p99, mean;
};

template <class F>
Stats time_calls(int iterations, F&& call) {
  for (int i = 0; i < std::min(iterations, 200); ++i) call();  // warm caches, allocator and lazy initialisation
  std::vector<double> us(iterations);
  for (int i = 0; i < iterations; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    call();
    us[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  double sum = 0;
  for (double u : us) sum += u;
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)], sum / us.size()};
}

std::vector<int64_t> with_batch(std::vector<int64_t> shape, int64_t batch) {
  for (auto& d : shape)
    if (d < 0) d = batch;
  return shape;
}

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: caldera_bench MODEL BATCH ITERATIONS [THREADS=1]\n");
    return 2;
  }
  std::string path = argv[1];
  int64_t batch = std::stoll(argv[2]);
  int iterations = std::stoi(argv[3]);
  int threads = argc > 4 ? std::stoi(argv[4]) : 1;
  at::set_num_threads(threads);
  try {
    caldera::Model model(path);
    std::vector<int64_t> xs, ys;
    std::vector<float> x, y;
    xs = with_batch(model.input_shape(0), batch);
    ys = with_batch(model.output_shape(0), batch);
    x.assign(numel(xs), 0.5f);
    y.assign(numel(ys), 0.0f);
    Stats api = time_calls(iterations, [&] { model.run(x.data(), xs, y.data(), ys); });

    // The bare call: what a C++ user writes against libtorch alone (tensors in, tensors out, copy out).
    std::string file = path;
    if (file.size() < 4 || file.substr(file.size() - 4) != ".pt2") file += "/model.aoti.pt2";
    torch::inductor::AOTIModelPackageLoader loader(file, "model", /*run_single_threaded=*/true);
    c10::InferenceMode guard;
    std::vector<at::Tensor> inputs{at::from_blob(x.data(), xs, at::kFloat)};
    Stats bare = time_calls(iterations, [&] {
      auto out = loader.run(inputs);
      std::memcpy(y.data(), out[0].data_ptr(), out[0].nbytes());
    });
    std::printf(
        "{\"caller\": \"c++\", \"model\": \"%s\", \"batch\": %lld, \"iterations\": %d, \"threads\": %d, "
        "\"caldera_us\": {\"p50\": %.3f, \"p99\": %.3f, \"mean\": %.3f}, "
        "\"bare_us\": {\"p50\": %.3f, \"p99\": %.3f, \"mean\": %.3f}, \"bare\": \"AOTIModelPackageLoader::run\"}\n",
        path.c_str(), static_cast<long long>(batch), iterations, threads, api.p50, api.p99, api.mean, bare.p50,
        bare.p99, bare.mean);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "caldera_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
