// The main job's heat simulation (src/caldera/sims/heat.py) in C++, calling the exported surrogate in-process.
//
// Each window the surrogate maps (T, k) to T a span of explicit steps later: the span it was trained on, read from
// the package's metadata (`caldera.data.steps`, what `caldera export` recorded from the run's data.args.steps), or
// given as STEPS. The physics computes the same span, and the example prints the surrogate's relative L2 residual
// against it and the time of both. Each window starts new plates from the initial conditions the surrogate was
// trained on: a state already diffused by a window lies outside its training data.
//   heat_surrogate_cpp EXPORT_DIR|PACKAGE.pt2 [PLATES=8] [WINDOWS=3] [STEPS=the package's] [DEVICE=cpu]
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "caldera.hpp"

namespace {

constexpr double kDt = 0.2;       // heat.py DT: stable since 4 * max(k) * dt <= 1
constexpr double kPi = 3.14159265358979323846;

// A small deterministic generator (xorshift64*): initial conditions need not match NumPy's, only its distribution.
struct Rng {
  uint64_t s;
  double uniform(double lo = 0, double hi = 1) {
    s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
    return lo + (hi - lo) * static_cast<double>((s * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
  }
  double normal() { return std::sqrt(-2 * std::log(uniform(1e-12, 1))) * std::cos(2 * kPi * uniform()); }
};

// heat.py initial_conditions for one plate: k = 0.2 + 0.8 * (a smooth field of low Fourier modes scaled to [0,1]);
// T0 = three Gaussian hot spots; zero edges.
void initial(Rng& rng, int g, double* t, double* k) {
  std::vector<double> f(g * g, 0.0);
  for (int kx = 1; kx <= 3; ++kx)
    for (int ky = 1; ky <= 3; ++ky) {
      double a = rng.normal() / (kx * ky), px = rng.uniform(0, 2 * kPi), py = rng.uniform(0, 2 * kPi);
      for (int i = 0; i < g; ++i)
        for (int j = 0; j < g; ++j)
          f[i * g + j] += a * std::sin(kPi * kx * i / (g - 1.0) + px) * std::sin(kPi * ky * j / (g - 1.0) + py);
    }
  double lo = f[0], hi = f[0];
  for (double v : f) lo = std::fmin(lo, v), hi = std::fmax(hi, v);
  for (int c = 0; c < g * g; ++c) k[c] = 0.2 + 0.8 * (f[c] - lo) / (hi - lo + 1e-12), t[c] = 0;
  for (int s = 0; s < 3; ++s) {
    double cx = rng.uniform(0.2, 0.8), cy = rng.uniform(0.2, 0.8), w = rng.uniform(0.05, 0.12);
    double amp = rng.uniform(0.5, 1.0);
    for (int i = 0; i < g; ++i)
      for (int j = 0; j < g; ++j) {
        double x = i / (g - 1.0) - cx, y = j / (g - 1.0) - cy;
        t[i * g + j] += amp * std::exp(-(x * x + y * y) / (2 * w * w));
      }
  }
  for (int i = 0; i < g; ++i) t[i] = t[(g - 1) * g + i] = t[i * g] = t[i * g + g - 1] = 0;
}

// heat.py simulate for one plate: explicit finite volumes of div(k grad T), harmonic-mean face conductivities.
void simulate(int g, int steps, const double* k, double* t) {
  std::vector<double> kx((g - 1) * g), ky(g * (g - 1)), div(g * g);
  for (int i = 0; i + 1 < g; ++i)
    for (int j = 0; j < g; ++j) {
      double a = k[(i + 1) * g + j], b = k[i * g + j];
      kx[i * g + j] = 2 * a * b / (a + b);
    }
  for (int i = 0; i < g; ++i)
    for (int j = 0; j + 1 < g; ++j) {
      double a = k[i * g + j + 1], b = k[i * g + j];
      ky[i * (g - 1) + j] = 2 * a * b / (a + b);
    }
  for (int s = 0; s < steps; ++s) {
    std::fill(div.begin(), div.end(), 0.0);
    for (int i = 0; i + 1 < g; ++i)
      for (int j = 0; j < g; ++j) {
        double f = kx[i * g + j] * (t[(i + 1) * g + j] - t[i * g + j]);
        div[i * g + j] += f, div[(i + 1) * g + j] -= f;
      }
    for (int i = 0; i < g; ++i)
      for (int j = 0; j + 1 < g; ++j) {
        double f = ky[i * (g - 1) + j] * (t[i * g + j + 1] - t[i * g + j]);
        div[i * g + j] += f, div[i * g + j + 1] -= f;
      }
    for (int c = 0; c < g * g; ++c) t[c] += kDt * div[c];
    for (int i = 0; i < g; ++i) t[i] = t[(g - 1) * g + i] = t[i * g] = t[i * g + g - 1] = 0;
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: heat_surrogate_cpp EXPORT_DIR|PACKAGE.pt2 [PLATES=8] [WINDOWS=3] [STEPS=the package's] "
                 "[DEVICE=cpu]\n");
    return 2;
  }
  int plates = argc > 2 ? std::stoi(argv[2]) : 8, windows = argc > 3 ? std::stoi(argv[3]) : 3;
  int steps = argc > 4 ? std::stoi(argv[4]) : 0;
  std::string device = argc > 5 ? argv[5] : "cpu";
  try {
    caldera::Model model(argv[1], device);
    // The span the surrogate replaces is the one it learnt: the run's data.args.steps, recorded in the package.
    std::string source = "heat", origin = "the command line";
    int recorded = 0;
    try {
      source = model.metadata("caldera.data.source");
      recorded = std::stoi(model.metadata("caldera.data.steps"));
    } catch (const caldera::Error& e) {
      if (steps <= 0) {
        std::fprintf(stderr, "heat_surrogate_cpp: %s: give the span the surrogate replaces (its data.args.steps) "
                     "as STEPS\n", e.what());
        return 2;
      }
    }
    if (source != "heat") {
      std::fprintf(stderr, "heat_surrogate_cpp: the model was trained on data '%s', not the heat simulation\n",
                   source.c_str());
      return 2;
    }
    if (steps <= 0) steps = recorded, origin = "the package's caldera.data.steps";
    else if (recorded > 0 && recorded != steps)
      std::printf("warning: the surrogate was trained for %d steps, not %d: the residual compares two spans\n",
                  recorded, steps);
    std::printf("window: %d explicit steps (from %s)\n", steps, origin.c_str());
    auto shape = model.input_shape(0);  // (-1, 2, g, g): the grid the surrogate was trained on
    if (shape.size() != 4 || shape[1] != 2 || shape[2] != shape[3]) {
      std::fprintf(stderr, "heat_surrogate_cpp: the model takes (batch, 2, g, g) fields [T, k], not this one\n");
      return 2;
    }
    const int g = static_cast<int>(shape[2]), cells = g * g;
    std::vector<double> t(plates * cells), k(plates * cells);
    Rng rng{0x9E3779B97F4A7C15ULL};
    auto new_plates = [&] {
      for (int p = 0; p < plates; ++p) initial(rng, g, &t[p * cells], &k[p * cells]);
    };
    new_plates();
    std::vector<float> x(plates * 2 * cells), y(plates * cells);
    auto fill = [&] {  // x = [T, k] per plate, as float32 (batch, 2, g, g)
      for (int p = 0; p < plates; ++p)
        for (int c = 0; c < cells; ++c) {
          x[(p * 2) * cells + c] = static_cast<float>(t[p * cells + c]);
          x[(p * 2 + 1) * cells + c] = static_cast<float>(k[p * cells + c]);
        }
    };
    fill();
    // The first call pays one-off costs (page faults, thread pools, lazy kernels): time it apart.
    auto first = std::chrono::steady_clock::now();
    model.run(x.data(), {plates, 2, g, g}, y.data(), {plates, 1, g, g});
    std::printf("first call (one-off set-up): %.3f ms\n", seconds_since(first) * 1e3);
    double physics_s = 0, surrogate_s = 0, best_physics = 1e30, best_surrogate = 1e30;
    for (int w = 0; w < windows; ++w) {
      new_plates();
      fill();
      auto t0 = std::chrono::steady_clock::now();
      model.run(x.data(), {plates, 2, g, g}, y.data(), {plates, 1, g, g});
      double ts = seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
      for (int p = 0; p < plates; ++p) simulate(g, steps, &k[p * cells], &t[p * cells]);
      double tp = seconds_since(t0);
      double err = 0, norm = 0;
      for (int c = 0; c < plates * cells; ++c) err += (y[c] - t[c]) * (y[c] - t[c]), norm += t[c] * t[c];
      physics_s += tp, surrogate_s += ts;
      best_physics = std::fmin(best_physics, tp), best_surrogate = std::fmin(best_surrogate, ts);
      std::printf("window %d: residual %.4g (relative L2)  physics %.3f ms  surrogate %.3f ms\n", w,
                  std::sqrt(err / (norm + 1e-30)), tp * 1e3, ts * 1e3);
    }
    std::printf("total: physics %.3f ms, surrogate %.3f ms for %d plates of %dx%d, %d windows of %d steps\n",
                physics_s * 1e3, surrogate_s * 1e3, plates, g, g, windows, steps);
    // On a shared machine a window is often pre-empted: the fastest window is the cost undisturbed. The surrogate's
    // cost does not depend on the span, the physics' is proportional to it.
    std::printf("fastest window: physics %.3f ms, surrogate %.3f ms; surrogate / physics time: %.2f (cross-over at "
                "about %.0f steps: beyond it the surrogate is faster)\n",
                best_physics * 1e3, best_surrogate * 1e3, best_surrogate / best_physics,
                steps * best_surrogate / best_physics);
  } catch (const caldera::Error& e) {
    std::fprintf(stderr, "heat_surrogate_cpp: %s\n", e.what());
    return 1;
  }
  return 0;
}
