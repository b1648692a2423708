// Header-only C++ wrapper over caldera.h: a move-only Model that frees itself and throws caldera::Error.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "caldera.h"

namespace caldera {

/// A failed call: the status code and the library's one-line message.
class Error : public std::runtime_error {
 public:
  Error(caldera_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  caldera_status status() const noexcept { return status_; }

 private:
  caldera_status status_;
};

template <class T>
constexpr int dtype_of();
template <>
constexpr int dtype_of<float>() { return CALDERA_FLOAT32; }
template <>
constexpr int dtype_of<double>() { return CALDERA_FLOAT64; }

inline void check(caldera_status status) {
  if (status != CALDERA_OK) throw Error(status, caldera_last_error());
}

/// A loaded model (an export directory, a .pt2 package or a .ts file) on "cpu", "cuda" or "cuda:N".
class Model {
 public:
  explicit Model(const std::string& path, const std::string& device = "cpu") {
    check(caldera_load(path.c_str(), device.c_str(), &m_));
  }
  Model(Model&& other) noexcept : m_(std::exchange(other.m_, nullptr)) {}
  Model& operator=(Model&& other) noexcept {
    if (this != &other) {
      caldera_free(m_);
      m_ = std::exchange(other.m_, nullptr);
    }
    return *this;
  }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  ~Model() { caldera_free(m_); }

  /// Run on one C-order array x of shape x_shape and write the first output into y of shape y_shape.
  template <class T, class U>
  void run(const T* x, const std::vector<int64_t>& x_shape, U* y, const std::vector<int64_t>& y_shape) {
    check(caldera_run(m_, x, x_shape.data(), static_cast<int>(x_shape.size()), dtype_of<T>(), y, y_shape.data(),
                      static_cast<int>(y_shape.size()), dtype_of<U>()));
  }

  int n_inputs() const { return caldera_n_inputs(m_); }
  int n_outputs() const { return caldera_n_outputs(m_); }
  /// The recorded shape of input i (-1 = dynamic).
  std::vector<int64_t> input_shape(int i) const { return shape(caldera_input_shape, i); }
  std::vector<int64_t> output_shape(int i) const { return shape(caldera_output_shape, i); }
  /// The package metadata value of key (e.g. "caldera.data.steps"); throws caldera::Error when it is missing.
  std::string metadata(const std::string& key) const {
    int64_t len = 0;
    caldera_status status = caldera_metadata(m_, key.c_str(), nullptr, &len);
    if (len < 0) throw Error(status, caldera_last_error());
    std::string value(static_cast<size_t>(len) + 1, '\0');
    len = static_cast<int64_t>(value.size());
    check(caldera_metadata(m_, key.c_str(), value.data(), &len));
    value.resize(static_cast<size_t>(len));
    return value;
  }
  caldera_model* get() const noexcept { return m_; }

 private:
  std::vector<int64_t> shape(caldera_status (*f)(const caldera_model*, int, int64_t*, int*), int i) const {
    int64_t s[CALDERA_MAX_NDIM];
    int n = 0;
    check(f(m_, i, s, &n));
    return std::vector<int64_t>(s, s + n);
  }
  caldera_model* m_ = nullptr;
};

}  // namespace caldera
