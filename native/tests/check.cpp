// Test driver (tests/test_native.py): runs a model on a raw float32 C-order input file and writes the output file,
// after making the library fail on purpose (a wrong path, shape and dtype) to show the caller goes on.
//   caldera_check_cpp MODEL DEVICE X.bin d0,d1,... Y.bin e0,e1,...
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "caldera.hpp"

extern "C" int caldera_check_from_c(const char* missing_path);  // check_c.c: the C API from C

static std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream s(text);
  std::string d;
  while (std::getline(s, d, ',')) shape.push_back(std::stoll(d));
  return shape;
}

static int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

static void expect_error(const char* what, caldera::Model& model, const void* x, std::vector<int64_t> xs, int xt,
                         float* y, const std::vector<int64_t>& ys) {
  caldera_status s = caldera_run(model.get(), x, xs.data(), static_cast<int>(xs.size()), xt, y, ys.data(),
                                 static_cast<int>(ys.size()), CALDERA_FLOAT32);
  std::cout << "error " << what << " " << s << " " << caldera_last_error() << std::endl;
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: caldera_check_cpp MODEL DEVICE X.bin x_shape Y.bin y_shape\n";
    return 2;
  }
  std::string path = argv[1], device = argv[2];
  auto xs = parse_shape(argv[4]), ys = parse_shape(argv[6]);
  std::vector<float> x(numel(xs)), y(numel(ys), -1.0f);
  std::ifstream(argv[3], std::ios::binary).read(reinterpret_cast<char*>(x.data()), x.size() * sizeof(float));

  if (caldera_check_from_c("/nonexistent/model.aoti.pt2") != CALDERA_ERR_LOAD) return 1;
  try {
    caldera::Model missing("/nonexistent/export_dir", device);
    return 1;
  } catch (const caldera::Error& e) {
    std::cout << "error path " << e.status() << " " << e.what() << std::endl;
  }
  try {
    caldera::Model model(path, device);
    std::cout << "inputs " << model.n_inputs() << " outputs " << model.n_outputs() << std::endl;
    // The package metadata: a buffer too small says the size it needs; a key export records; the heat run's span, or
    // a status and one line when the package has none (the caller goes on).
    int64_t len = 0;
    caldera_status s = caldera_metadata(model.get(), "caldera.format", nullptr, &len);
    std::cout << "metadata size " << s << " " << len << std::endl;
    for (const char* key : {"caldera.format", "caldera.data.steps"}) try {
        std::string value = model.metadata(key);
        std::cout << "metadata " << key << " 0 " << value << std::endl;
      } catch (const caldera::Error& e) {
        std::cout << "error metadata " << e.status() << " " << e.what() << std::endl;
      }
    // A wrong shape: the last dimension one too large (the buffer is big enough, the model must refuse anyway).
    std::vector<float> big(x.size() * 2 + 64);
    auto wrong = xs;
    wrong.back() += 1;
    expect_error("shape", model, big.data(), wrong, CALDERA_FLOAT32, y.data(), ys);
    std::vector<double> xd(x.begin(), x.end());
    expect_error("dtype", model, xd.data(), xs, CALDERA_FLOAT64, y.data(), ys);
    model.run(x.data(), xs, y.data(), ys);  // and the caller goes on
  } catch (const caldera::Error& e) {
    std::cout << "failed " << e.status() << " " << e.what() << std::endl;
    return 1;
  }
  std::ofstream(argv[5], std::ios::binary).write(reinterpret_cast<const char*>(y.data()), y.size() * sizeof(float));
  std::cout << "ok" << std::endl;
  return 0;
}
