// leadtune's fused CPU kernels, compiled on first use by trainables/models/kernels.py.
//
// Each function is one pass over memory for work that takes PyTorch's eager mode several
// elementwise kernels (and as many passes). They compute the same functions as the PyTorch code
// paths they replace; tests/test_fast_path.py checks both against PyTorch's modules in float64.
//
// GRU (PyTorch's formulation, gate order r, z, n):
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = n + z (h - n).
// The input products W_i x of all steps are one matrix product before the loop; each step is one
// product W_h h and one fused pass for the rest.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

namespace {

// Exponentials for the GRU's gates, safe on every input and vectorisable.
//
// The kernels are compiled with IEEE semantics (no -ffast-math): under -ffast-math GCC calls
// glibc's vector exp for finite-only inputs, which returns NaN where exp overflows (a gate
// pre-activation beyond about +-88, as a 30 mV electrode artefact produces), and it may assume
// that no NaN ever arrives, hiding the ones that do. Without -ffast-math GCC does not vectorise
// std::exp, so these loops compute exp themselves, only ever of a non-positive argument: it
// cannot overflow, and the results are within a few units in the last place of std::exp.
//
// Every gate uses exp(-|x|) in (0, 1], in forms without cancellation:
//   sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, with e = exp(-|x|);
//   tanh(|x|) = -m / (2 + m), with m = expm1(-2|x|) in (-1, 0], then the sign of x.
template <typename T>
struct ExpTerms;

template <>
struct ExpTerms<float> {
  static constexpr int kDegree = 8;  // Taylor terms r^k / k!, |r| <= ln2 / 2: error < 2e-9
  static constexpr float kLowest = -87.33f;  // ln(smallest normal) = -87.3365
  static constexpr int kMantissa = 23, kBias = 127;
  using Int = int32_t;
};

template <>
struct ExpTerms<double> {
  static constexpr int kDegree = 14;  // error < 1e-18
  static constexpr double kLowest = -708.39;  // ln(smallest normal) = -708.396
  static constexpr int kMantissa = 52, kBias = 1023;
  using Int = int64_t;
};

// 1 + r/K (1 + r/(K+1) (... (1 + r/Degree))), unrolled at compile time; r * exp_series<2> is
// the Taylor series of exp(r) - 1 up to r^Degree / Degree!.
template <typename T, int K, int Degree>
inline T exp_series(T r) {
  if constexpr (K > Degree) {
    return T(1);
  } else {
    return std::fma(r * (T(1) / T(K)), exp_series<T, K + 1, Degree>(r), T(1));
  }
}

// exp(y) - 1 and exp(y) for y <= 0; NaN stays NaN. y = n ln2 + r, exp(y) = 2^n (1 + q(r)).
template <typename T>
inline void expm1_and_exp_nonpositive(T y, T& expm1_out, T& exp_out) {
  using Terms = ExpTerms<T>;
  using Int = typename Terms::Int;
  const T clamped = y < Terms::kLowest ? Terms::kLowest : y;  // NaN compares false: kept
  const T n = std::floor(clamped * T(1.4426950408889634) + T(0.5));
  // ln 2 in two parts, so that r = y - n ln2 is exact to the last bit.
  const T r = (clamped - n * T(0.693145751953125)) - n * T(1.4286068203094172321e-6);
  const T q = r * exp_series<T, 2, Terms::kDegree>(r);  // exp(r) - 1
  const Int bits = (static_cast<Int>(n) + Terms::kBias) << Terms::kMantissa;
  T scale;
  __builtin_memcpy(&scale, &bits, sizeof(T));
  // Below kLowest exp(y) is subnormal or zero: flushed to zero (an absolute error under the
  // smallest normal number).
  const T e = y < Terms::kLowest ? T(0) : scale + scale * q;
  exp_out = e;
  expm1_out = n == T(0) ? q : e - T(1);  // no cancellation: |y| >= ln2 / 2 when n != 0
}

template <typename T>
inline T sigmoid(T x) {
  T unused, e;
  expm1_and_exp_nonpositive(-std::fabs(x), unused, e);
  const T s = T(1) / (T(1) + e);
  return x >= T(0) ? s : e * s;
}

template <typename T>
inline T safe_tanh(T x) {
  T m, unused;
  expm1_and_exp_nonpositive(T(-2) * std::fabs(x), m, unused);
  return std::copysign(-m / (T(2) + m), x);
}

// Rows per parallel chunk: at least ~16k elements of work per thread.
inline int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width));
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Per-thread partial sums, reduced after the parallel loop.
struct Partials {
  int64_t threads, width;
  std::vector<double> first, second;
  Partials(int64_t width_)
      : threads(at::get_num_threads()),
        width(width_),
        first(threads * width_, 0.0),
        second(threads * width_, 0.0) {}
  double* a(int64_t tid) { return first.data() + tid * width; }
  double* b(int64_t tid) { return second.data() + tid * width; }
  void reduce(std::vector<double>& sum_a, std::vector<double>& sum_b) const {
    sum_a.assign(width, 0.0);
    sum_b.assign(width, 0.0);
    for (int64_t t = 0; t < threads; ++t) {
      for (int64_t ch = 0; ch < width; ++ch) {
        sum_a[ch] += first[t * width + ch];
        sum_b[ch] += second[t * width + ch];
      }
    }
  }
};

inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / width); }

// Rows summed in the input's precision before each addition to the double accumulators.
constexpr int64_t kSumBlock = 64;

// Per-channel count, mean and sum of squared deviations (M2), per thread, merged with the
// pairwise update of Chan, Golub and LeVeque: no step subtracts two large, nearly equal sums.
struct ChannelMoments {
  int64_t threads, width;
  std::vector<double> counts, means, m2s;
  explicit ChannelMoments(int64_t width_)
      : threads(at::get_num_threads()),
        width(width_),
        counts(threads, 0.0),
        means(threads * width_, 0.0),
        m2s(threads * width_, 0.0) {}
  static void combine(double& count, double* mean, double* m2, double other_count,
                      const double* other_mean, const double* other_m2, int64_t width) {
    if (other_count == 0.0) {
      return;
    }
    const double total = count + other_count;
    const double weight = other_count / total;
    const double cross = count * other_count / total;
    for (int64_t ch = 0; ch < width; ++ch) {
      const double delta = other_mean[ch] - mean[ch];
      mean[ch] += delta * weight;
      m2[ch] += other_m2[ch] + delta * delta * cross;
    }
    count = total;
  }
  void merge(int64_t tid, double count, const double* mean, const double* m2) {
    combine(counts[tid], means.data() + tid * width, m2s.data() + tid * width, count, mean, m2,
            width);
  }
  void reduce(std::vector<double>& mean, std::vector<double>& m2) const {
    double count = 0.0;
    mean.assign(width, 0.0);
    m2.assign(width, 0.0);
    for (int64_t t = 0; t < threads; ++t) {
      combine(count, mean.data(), m2.data(), counts[t], means.data() + t * width,
              m2s.data() + t * width, width);
    }
  }
};

}  // namespace

// One GRU layer forward over all steps, from a zero initial state.
// projected: (T, N, 3H), the input products W_ih x without bias. w_hh: (3H, H); b_ih, b_hh: (3H).
// Outputs (preallocated): states (T, N, H), gates (T, N, 2H) = [r, z], candidate (T, N, H) = n,
// recurrent (T, N, H) = W_hn h + b_hn (kept for the backward pass).
void gru_forward(const at::Tensor& projected, const at::Tensor& w_hh, const at::Tensor& b_ih,
                 const at::Tensor& b_hh, at::Tensor states, at::Tensor gates,
                 at::Tensor candidate, at::Tensor recurrent) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &projected, &recurrent, &states, &gates, &candidate, &b_ih, &b_hh}) {
    check_cpu_contiguous(*t, "GRU buffer");
  }
  const int64_t steps = projected.size(0), batch = projected.size(1), hidden = states.size(2);
  const auto w_hh_t = w_hh.t();
  // W_hh h_prev of one step, all three gates in one product; zero for the zero initial state.
  auto product = at::zeros({batch, 3 * hidden}, states.options());
  const auto zero_state = at::zeros({batch, hidden}, states.options());
  for (int64_t step = 0; step < steps; ++step) {
    if (step > 0) {
      at::mm_out(product, states.select(0, step - 1), w_hh_t);
    }
    AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "gru_forward", [&] {
      const scalar_t* p_all = projected.select(0, step).data_ptr<scalar_t>();
      const scalar_t* q_all = product.data_ptr<scalar_t>();
      const scalar_t* prev_all = step > 0 ? states.select(0, step - 1).data_ptr<scalar_t>()
                                          : zero_state.data_ptr<scalar_t>();
      const scalar_t* bi = b_ih.data_ptr<scalar_t>();
      const scalar_t* bh = b_hh.data_ptr<scalar_t>();
      scalar_t* g_all = gates.select(0, step).data_ptr<scalar_t>();
      scalar_t* n_all = candidate.select(0, step).data_ptr<scalar_t>();
      scalar_t* rec_all = recurrent.select(0, step).data_ptr<scalar_t>();
      scalar_t* h_all = states.select(0, step).data_ptr<scalar_t>();
      at::parallel_for(0, batch, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* p = p_all + b * 3 * hidden;
          const scalar_t* q = q_all + b * 3 * hidden;
          const scalar_t* prev = prev_all + b * hidden;
          scalar_t* g = g_all + b * 2 * hidden;
          scalar_t* n_b = n_all + b * hidden;
          scalar_t* rec = rec_all + b * hidden;
          scalar_t* h = h_all + b * hidden;
          _Pragma("omp simd")
          for (int64_t j = 0; j < hidden; ++j) {
            const scalar_t r = sigmoid((p[j] + bi[j]) + (q[j] + bh[j]));
            const scalar_t z =
                sigmoid((p[hidden + j] + bi[hidden + j]) + (q[hidden + j] + bh[hidden + j]));
            const scalar_t hn = q[2 * hidden + j] + bh[2 * hidden + j];
            const scalar_t n = safe_tanh(p[2 * hidden + j] + bi[2 * hidden + j] + r * hn);
            g[j] = r;
            g[hidden + j] = z;
            rec[j] = hn;
            n_b[j] = n;
            h[j] = n + z * (prev[j] - n);
          }
        }
      });
    });
  }
}

// One GRU layer backward over all steps (the matching forward is gru_forward).
// grad_states: (T, N, H) gradient of the loss with respect to every output state.
// Output (preallocated): grad_gates (T, N, 4H), the gradients of the pre-activations in the
// column blocks [d a_n * r, d a_r, d a_z, d a_n]. Columns 0..3H are the gradient through
// W_hh h + b_hh (gate order n, r, z: w_hh_nrz is W_hh with its rows in that order), columns
// H..4H the gradient through W_ih x + b_ih (gate order r, z, n, as W_ih): both are plain strided
// views for the matrix products that follow, with no copy.
// Returns the bias gradients (grad_b_ih (3H), grad_b_hh (3H)), summed while walking the steps.
std::vector<at::Tensor> gru_backward(const at::Tensor& grad_states, const at::Tensor& states,
                                     const at::Tensor& recurrent, const at::Tensor& gates,
                                     const at::Tensor& candidate, const at::Tensor& w_hh_nrz,
                                     at::Tensor grad_gates) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &grad_states, &states, &recurrent, &gates, &candidate, &grad_gates}) {
    check_cpu_contiguous(*t, "GRU buffer");
  }
  const int64_t steps = states.size(0), batch = states.size(1), hidden = states.size(2);
  TORCH_CHECK(grad_gates.size(2) == 4 * hidden, "grad_gates must be (T, N, 4H)");
  auto grad_state = grad_states.select(0, steps - 1).clone();  // dL/dh of the step being walked
  auto carry = at::empty_like(grad_state);
  const auto zeros = at::zeros_like(grad_state);
  // Per-thread sums of the four column blocks over rows and steps, in double.
  Partials bias_sums(4 * hidden);
  for (int64_t step = steps - 1; step >= 0; --step) {
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "gru_backward", [&] {
      const scalar_t* dh_all = grad_state.data_ptr<scalar_t>();
      // At step 0 the previous state and the previous output's gradient are zero.
      const scalar_t* prev_all =
          step > 0 ? states.select(0, step - 1).data_ptr<scalar_t>() : zeros.data_ptr<scalar_t>();
      const scalar_t* next_grad_all = step > 0
                                          ? grad_states.select(0, step - 1).data_ptr<scalar_t>()
                                          : zeros.data_ptr<scalar_t>();
      const scalar_t* g_all = gates.select(0, step).data_ptr<scalar_t>();
      const scalar_t* n_all = candidate.select(0, step).data_ptr<scalar_t>();
      const scalar_t* rec_all = recurrent.select(0, step).data_ptr<scalar_t>();
      scalar_t* out_all = grad_gates.select(0, step).data_ptr<scalar_t>();
      scalar_t* carry_all = carry.data_ptr<scalar_t>();
      at::parallel_for(0, batch, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> block(4 * hidden, scalar_t(0));  // this chunk's sums, this step
        scalar_t* sums = block.data();
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* dh = dh_all + b * hidden;
          const scalar_t* g = g_all + b * 2 * hidden;
          const scalar_t* n_b = n_all + b * hidden;
          const scalar_t* rec_b = rec_all + b * hidden;
          const scalar_t* prev = prev_all + b * hidden;
          const scalar_t* next_grad = next_grad_all + b * hidden;
          scalar_t* out = out_all + b * 4 * hidden;
          scalar_t* c = carry_all + b * hidden;
_Pragma("omp simd")
          for (int64_t j = 0; j < hidden; ++j) {
            const scalar_t r = g[j], z = g[hidden + j], n = n_b[j], d = dh[j];
            const scalar_t h_prev = prev[j];
            const scalar_t grad_z = d * (h_prev - n) * z * (scalar_t(1) - z);
            const scalar_t grad_n = d * (scalar_t(1) - z) * (scalar_t(1) - n * n);
            const scalar_t grad_r = grad_n * rec_b[j] * r * (scalar_t(1) - r);
            out[j] = grad_n * r;
            out[hidden + j] = grad_r;
            out[2 * hidden + j] = grad_z;
            out[3 * hidden + j] = grad_n;
            c[j] = d * z + next_grad[j];
            sums[j] += grad_n * r;
            sums[hidden + j] += grad_r;
            sums[2 * hidden + j] += grad_z;
            sums[3 * hidden + j] += grad_n;
          }
        }
        double* total = bias_sums.a(at::get_thread_num());
        for (int64_t j = 0; j < 4 * hidden; ++j) {
          total[j] += sums[j];
        }
      });
    });
    if (step > 0) {  // dL/dh_prev = carry + (gradient of W_hh h_prev + b_hh) @ W_hh
      carry.addmm_(grad_gates.select(0, step).narrow(1, 0, 3 * hidden), w_hh_nrz);
      std::swap(grad_state, carry);
    }
  }
  std::vector<double> sums, unused;
  bias_sums.reduce(sums, unused);
  auto as_tensor = [&](std::vector<double> values) {
    return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(states.scalar_type());
  };
  // b_hh receives [d a_r, d a_z, d a_n * r]; b_ih receives [d a_r, d a_z, d a_n].
  std::vector<double> hh(sums.begin() + hidden, sums.begin() + 3 * hidden);
  hh.insert(hh.end(), sums.begin(), sums.begin() + hidden);
  std::vector<double> ih(sums.begin() + hidden, sums.end());
  return {as_tensor(ih), as_tensor(hh)};
}

// ---------------------------------------------------------------------------------------------
// Training-mode BatchNorm (batch statistics) + ReLU over channels-last (M, c) rows.
//
// The input is the concatenation of several (M, c_i) parts (the branches of an Inception block).
// Forward: one pass for the per-channel statistics (sums of blocks of rows, added in double and
// shifted by the first row for precision), one pass writing ReLU(BN(x)) into the concatenated
// output. Backward: one pass for the two per-channel sums, one pass writing the gradients.
// PyTorch's eager kernels take about twice as many passes over memory.

namespace {

// The parts of one concatenated BatchNorm: row pointers and column offsets.
template <typename scalar_t>
struct PartLayout {
  std::vector<const scalar_t*> data;
  std::vector<int64_t> width, offset;
  int64_t rows = 0, total = 0;
  explicit PartLayout(const std::vector<at::Tensor>& parts) {
    TORCH_CHECK(!parts.empty(), "no parts");
    rows = parts[0].size(0);
    for (const auto& part : parts) {
      check_cpu_contiguous(part, "part");
      TORCH_CHECK(part.dim() == 2 && part.size(0) == rows, "parts must be (M, c_i) with equal M");
      data.push_back(part.data_ptr<scalar_t>());
      width.push_back(part.size(1));
      offset.push_back(total);
      total += part.size(1);
    }
  }
};

// Calls body(row, column offset, width) for every part of the rows [r0, r1), in row order.
template <typename scalar_t, typename Body>
inline void for_parts_of_rows(const PartLayout<scalar_t>& layout, int64_t r0, int64_t r1,
                              Body&& body) {
  for (int64_t r = r0; r < r1; ++r) {
    for (size_t p = 0; p < layout.data.size(); ++p) {
      const int64_t w = layout.width[p];
      body(layout.data[p] + r * w, layout.offset[p], w);
    }
  }
}

}  // namespace

// Where MaxPool(2, stride 2) over time follows the BatchNorm + ReLU (both Inception blocks), the
// two are fused: the forward pass writes only the pooled rows (the full-size output is never
// stored), and the backward pass routes the pooled gradient to the larger of each pair itself.
// The rows are (N, steps) sequences; the pooled tensor (N, steps / 2, C) may have any strides for
// its first two axes (a time-major view included); its channels must be contiguous.
//
// The backward pass does not read the forward's output: it recomputes the pre-activation
// v = x * scale + offset from the input with the forward's own per-channel scale and offset and
// the same fused multiply-add as bn_relu, so the ReLU mask and the pooling's choices are exactly
// the forward's.
namespace {

template <typename scalar_t>
inline scalar_t bn_relu(scalar_t x, scalar_t scale, scalar_t offset) {
  const scalar_t v = std::fma(x, scale, offset);
  return v <= scalar_t(0) ? scalar_t(0) : v;  // a NaN passes, as through PyTorch's ReLU
}

// The larger of a and b, the first on a tie; a NaN wins, as in PyTorch's max pooling.
template <typename scalar_t>
inline scalar_t pair_max(scalar_t a, scalar_t b) {
  // (Written so that GCC vectorises it under IEEE semantics; a + b is NaN where either is.
  // A pair of +inf and -inf, which only an already overflowed model produces, gives NaN.)
  const scalar_t larger = a < b ? b : a;
  const scalar_t sum = a + b;
  return sum != sum ? sum : larger;
}

// The pooled tensor's geometry: row r = n * steps + t of the (M, C) rows pools into
// (n, t / 2); an odd last step is dropped.
struct PoolLayout {
  int64_t steps = 0, stride_n = 0, stride_t = 0;
  PoolLayout(const c10::optional<at::Tensor>& pooled, int64_t steps_, int64_t rows,
             int64_t channels) {
    if (!pooled.has_value() || !pooled->defined()) {
      return;
    }
    const auto& p = *pooled;
    TORCH_CHECK(steps_ > 1 && rows % steps_ == 0, "pooling needs rows = N * steps, steps > 1");
    TORCH_CHECK(p.device().is_cpu() && p.dim() == 3 && p.size(0) == rows / steps_ &&
                    p.size(1) == steps_ / 2 && p.size(2) == channels && p.stride(2) == 1,
                "pooled tensor must be (N, steps / 2, C) with contiguous channels");
    steps = steps_;
    stride_n = p.stride(0);
    stride_t = p.stride(1);
  }
  bool active() const { return steps > 0; }
  int64_t windows() const { return steps / 2; }
  // Units per sequence: the pairs, and an odd last step alone.
  int64_t per_sequence() const { return steps / 2 + steps % 2; }
};

// Calls body(unit, n, i) for the units [begin, end) of N sequences of `per_sequence` units each,
// unit = n * per_sequence + i, without a division per unit.
template <typename Body>
inline void for_units(int64_t begin, int64_t end, int64_t per_sequence, Body&& body) {
  int64_t n = begin / per_sequence, i = begin % per_sequence;
  for (int64_t unit = begin; unit < end; ++unit) {
    body(unit, n, i);
    if (++i == per_sequence) {
      i = 0;
      ++n;
    }
  }
}

}  // namespace

// Training-mode BatchNorm + ReLU of the concatenation of (M, c_i) parts: written into `out`
// (M, sum c_i) where given, and with `pooled` given, MaxPool(2) over time of it written into
// pooled (see PoolLayout; `steps` is the sequence length). At least one of the two is needed.
// Returns (mean, invstd, biased variance, scale, offset), each (sum c_i,), in the input's dtype;
// scale and offset are what the backward pass needs to recompute the output.
std::vector<at::Tensor> batch_norm_relu_forward(const std::vector<at::Tensor>& parts,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                double eps, c10::optional<at::Tensor> out,
                                                c10::optional<at::Tensor> pooled, int64_t steps) {
  TORCH_CHECK(!parts.empty(), "no parts");
  const bool write_out = out.has_value() && out->defined();
  const int64_t all_rows = parts[0].size(0), all_channels = weight.size(0);
  if (write_out) {
    check_cpu_contiguous(*out, "out");
    TORCH_CHECK(out->size(0) == all_rows && out->size(1) == all_channels, "out shape mismatch");
  }
  const PoolLayout pool(pooled, steps, all_rows, all_channels);
  TORCH_CHECK(write_out || pool.active(), "nothing to write: give out, pooled or both");
  auto mean = at::empty({all_channels}, parts[0].options());
  auto invstd = at::empty_like(mean);
  auto variance = at::empty_like(mean);
  auto scale_out = at::empty_like(mean);
  auto offset_out = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(parts[0].scalar_type(), "batch_norm_relu_forward", [&] {
    const PartLayout<scalar_t> layout(parts);
    const int64_t rows = layout.rows, channels = layout.total;
    TORCH_CHECK(rows > 0 && channels == all_channels, "parts and weight differ in channels");
    // Per-channel mean and variance without cancellation, whatever the data hold (a 300 mV
    // spike among 0.1 mV samples included): every block of rows is centred on its own mean
    // (a first pass over the block, then a second from the cache), and the blocks are merged.
    ChannelMoments moments(channels);
    at::parallel_for(0, rows, row_grain(channels), [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      std::vector<scalar_t> centre(channels), block_d(channels), block_q(channels);
      std::vector<double> block_mean(channels), block_m2(channels);
      for (int64_t r0 = begin; r0 < end; r0 += kSumBlock) {
        const int64_t r1 = std::min(end, r0 + kSumBlock);
        const double count = static_cast<double>(r1 - r0);
        std::fill(centre.begin(), centre.end(), scalar_t(0));
        std::fill(block_d.begin(), block_d.end(), scalar_t(0));
        std::fill(block_q.begin(), block_q.end(), scalar_t(0));
        for_parts_of_rows(layout, r0, r1, [&](const scalar_t* row, int64_t o, int64_t w) {
          scalar_t* c = centre.data() + o;
          _Pragma("omp simd")
          for (int64_t ch = 0; ch < w; ++ch) {
            c[ch] += row[ch];
          }
        });
        for (int64_t ch = 0; ch < channels; ++ch) {
          centre[ch] = static_cast<scalar_t>(centre[ch] / count);
        }
        for_parts_of_rows(layout, r0, r1, [&](const scalar_t* row, int64_t o, int64_t w) {
          const scalar_t* c = centre.data() + o;
          scalar_t* bd = block_d.data() + o;
          scalar_t* bq = block_q.data() + o;
          _Pragma("omp simd")
          for (int64_t ch = 0; ch < w; ++ch) {
            const scalar_t d = row[ch] - c[ch];
            bd[ch] += d;
            bq[ch] += d * d;
          }
        });
        // The centre is rounded: the deviations' own sum corrects the mean and the M2.
        for (int64_t ch = 0; ch < channels; ++ch) {
          const double d = block_d[ch];
          block_mean[ch] = static_cast<double>(centre[ch]) + d / count;
          block_m2[ch] = std::max(0.0, static_cast<double>(block_q[ch]) - d * d / count);
        }
        moments.merge(tid, count, block_mean.data(), block_m2.data());
      }
    });
    std::vector<double> channel_mean, channel_m2;
    moments.reduce(channel_mean, channel_m2);
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    scalar_t* m_out = mean.data_ptr<scalar_t>();
    scalar_t* i_out = invstd.data_ptr<scalar_t>();
    scalar_t* v_out = variance.data_ptr<scalar_t>();
    scalar_t* scale = scale_out.data_ptr<scalar_t>();
    scalar_t* offset_term = offset_out.data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < channels; ++ch) {
      const double var = channel_m2[ch] / rows;
      const double m = channel_mean[ch];
      const double inv = 1.0 / std::sqrt(var + eps);
      m_out[ch] = static_cast<scalar_t>(m);
      i_out[ch] = static_cast<scalar_t>(inv);
      v_out[ch] = static_cast<scalar_t>(var);
      scale[ch] = static_cast<scalar_t>(w[ch] * inv);
      offset_term[ch] = static_cast<scalar_t>(b[ch] - m * w[ch] * inv);
    }
    scalar_t* y = write_out ? out->data_ptr<scalar_t>() : nullptr;
    if (!pool.active()) {
      at::parallel_for(0, rows, row_grain(channels), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          for (size_t p = 0; p < layout.data.size(); ++p) {
            const int64_t width = layout.width[p], o = layout.offset[p];
            const scalar_t* row = layout.data[p] + r * width;
            const scalar_t* a = scale + o;
            const scalar_t* c = offset_term + o;
            scalar_t* dst = y + r * channels + o;
            _Pragma("omp simd")
            for (int64_t ch = 0; ch < width; ++ch) {
              dst[ch] = bn_relu(row[ch], a[ch], c[ch]);
            }
          }
        }
      });
      return;
    }
    // Pooled: rows in pairs (t, t + 1), t even, each pair writing its maximum (and both rows,
    // where out is wanted); an odd last step of a sequence only goes to out.
    scalar_t* pooled_data = pooled->data_ptr<scalar_t>();
    const int64_t windows = pool.windows(), per_sequence = pool.per_sequence();
    at::parallel_for(0, (rows / steps) * per_sequence, row_grain(2 * channels),
                     [&](int64_t begin, int64_t end) {
      for_units(begin, end, per_sequence, [&](int64_t, int64_t n, int64_t i) {
        const int64_t r = n * steps + 2 * i;
        const bool pair = i < windows;
        if (!pair && !write_out) {
          return;
        }
        scalar_t* pool_row = pair ? pooled_data + n * pool.stride_n + i * pool.stride_t : nullptr;
        for (size_t p = 0; p < layout.data.size(); ++p) {
          const int64_t width = layout.width[p], o = layout.offset[p];
          const scalar_t* row = layout.data[p] + r * width;
          const scalar_t* a = scale + o;
          const scalar_t* c = offset_term + o;
          if (!pair) {
            scalar_t* dst = y + r * channels + o;
            _Pragma("omp simd")
            for (int64_t ch = 0; ch < width; ++ch) {
              dst[ch] = bn_relu(row[ch], a[ch], c[ch]);
            }
            continue;
          }
          const scalar_t* next = row + width;
          scalar_t* pmax = pool_row + o;
          if (write_out) {
            scalar_t* dst = y + r * channels + o;
            scalar_t* dst_next = dst + channels;
            _Pragma("omp simd")
            for (int64_t ch = 0; ch < width; ++ch) {
              const scalar_t v = bn_relu(row[ch], a[ch], c[ch]);
              const scalar_t u = bn_relu(next[ch], a[ch], c[ch]);
              dst[ch] = v;
              dst_next[ch] = u;
              pmax[ch] = pair_max(v, u);
            }
          } else {
            _Pragma("omp simd")
            for (int64_t ch = 0; ch < width; ++ch) {
              const scalar_t v = bn_relu(row[ch], a[ch], c[ch]);
              const scalar_t u = bn_relu(next[ch], a[ch], c[ch]);
              pmax[ch] = pair_max(v, u);
            }
          }
        }
      });
    });
  });
  return {mean, invstd, variance, scale_out, offset_out};
}

// Backward of batch_norm_relu_forward, from the parts and the forward's returned statistics:
// grad is the gradient of the output (M, sum c_i, contiguous) or, with steps > 0, of the pooled
// tensor (N, steps / 2, sum c_i, any strides for its first two axes). Returns the gradient of
// every part, then grad_weight and grad_bias (sum c_i,).
std::vector<at::Tensor> batch_norm_relu_backward(const at::Tensor& grad,
                                                 const std::vector<at::Tensor>& parts,
                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                 const at::Tensor& scale_in,
                                                 const at::Tensor& offset_in,
                                                 const at::Tensor& weight, int64_t steps) {
  TORCH_CHECK(!parts.empty(), "no parts");
  const int64_t all_rows = parts[0].size(0), all_channels = weight.size(0);
  const PoolLayout pool(steps > 0 ? c10::optional<at::Tensor>(grad) : c10::nullopt, steps,
                        all_rows, all_channels);
  if (!pool.active()) {
    check_cpu_contiguous(grad, "grad");
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == all_rows && grad.size(1) == all_channels,
                "grad must be (M, sum c_i)");
  }
  std::vector<at::Tensor> results;
  for (const auto& part : parts) {
    results.push_back(at::empty_like(part));
  }
  auto grad_weight = at::empty({all_channels}, weight.options());
  auto grad_bias = at::empty_like(grad_weight);
  AT_DISPATCH_FLOATING_TYPES(parts[0].scalar_type(), "batch_norm_relu_backward", [&] {
    const PartLayout<scalar_t> layout(parts);
    const int64_t rows = layout.rows, channels = layout.total;
    TORCH_CHECK(channels == all_channels, "parts and weight differ in channels");
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* m = mean.data_ptr<scalar_t>();
    const scalar_t* fa = scale_in.data_ptr<scalar_t>();
    const scalar_t* fc = offset_in.data_ptr<scalar_t>();
    // Without pooling, a unit is one row; with pooling, a pair of rows (t, t + 1), t even, that
    // shares one pooled gradient, or an odd last step alone, which the pooling dropped.
    const int64_t per_sequence = pool.active() ? pool.per_sequence() : 1;
    const int64_t units = pool.active() ? (rows / steps) * per_sequence : rows;
    const int64_t grain = row_grain(pool.active() ? 2 * channels : channels);
    // Calls body(r, ch, gv, p) for every row r of a unit and every channel ch of part p, with gv
    // = dL/d(BN output before the ReLU), v recomputed exactly as the forward pass computed it.
    auto for_unit = [&](int64_t n, int64_t i, size_t p, auto&& body) {
      const int64_t width = layout.width[p], o = layout.offset[p];
      const scalar_t* a = fa + o;
      const scalar_t* c = fc + o;
      const scalar_t zero(0);
      if (!pool.active()) {  // n is the row
        const scalar_t* x = layout.data[p] + n * width;
        const scalar_t* gr = g + n * channels + o;
        _Pragma("omp simd")
        for (int64_t ch = 0; ch < width; ++ch) {
          const scalar_t gv = gr[ch];
          body(n, ch, std::fma(x[ch], a[ch], c[ch]) > zero ? gv : zero);  // ReLU(v) > 0 iff v > 0
        }
        return;
      }
      const int64_t r = n * steps + 2 * i;
      if (i == pool.windows()) {  // the odd last step: no gradient reaches it
        _Pragma("omp simd")
        for (int64_t ch = 0; ch < width; ++ch) {
          body(r, ch, zero);
        }
        return;
      }
      const scalar_t* x0 = layout.data[p] + r * width;
      const scalar_t* x1 = x0 + width;
      const scalar_t* gp = g + n * pool.stride_n + i * pool.stride_t + o;
      _Pragma("omp simd")
      for (int64_t ch = 0; ch < width; ++ch) {
        // The forward's choice, pair_max(ReLU(v0), ReLU(v1)), the first on a tie (PyTorch's
        // rule), and the ReLU's mask, from the pre-activations v (in this form GCC vectorises
        // the loop under IEEE semantics): row 0 gets the gradient where v0 > 0 and v0 >= v1,
        // row 1 where v1 > 0 and v1 > v0; where both are <= 0 neither does.
        const scalar_t gv = gp[ch];
        const scalar_t v0 = std::fma(x0[ch], a[ch], c[ch]);
        const scalar_t v1 = std::fma(x1[ch], a[ch], c[ch]);
        const bool second_wins = v0 < v1;
        body(r, ch, (v0 > zero) & !second_wins ? gv : zero);
        body(r + 1, ch, (v1 > zero) & second_wins ? gv : zero);
      }
    };
    Partials partials(channels);
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      double* sg = partials.a(at::get_thread_num());
      double* sgc = partials.b(at::get_thread_num());
      std::vector<scalar_t> block_g(channels), block_gc(channels);
      for (int64_t u0 = begin; u0 < end; u0 += kSumBlock) {
        std::fill(block_g.begin(), block_g.end(), scalar_t(0));
        std::fill(block_gc.begin(), block_gc.end(), scalar_t(0));
        for_units(u0, std::min(end, u0 + kSumBlock), per_sequence,
                  [&](int64_t, int64_t n, int64_t i) {
          for (size_t p = 0; p < layout.data.size(); ++p) {
            const int64_t width = layout.width[p], o = layout.offset[p];
            const scalar_t* xp = layout.data[p];
            const scalar_t* mp = m + o;
            scalar_t* bg = block_g.data() + o;
            scalar_t* bgc = block_gc.data() + o;
            for_unit(n, i, p, [&](int64_t r, int64_t ch, scalar_t gv) {
              bg[ch] += gv;
              bgc[ch] += gv * (xp[r * width + ch] - mp[ch]);
            });
          }
        });
        for (int64_t ch = 0; ch < channels; ++ch) {
          sg[ch] += block_g[ch];
          sgc[ch] += block_gc[ch];
        }
      }
    });
    std::vector<double> sum_grad, sum_grad_centred;
    partials.reduce(sum_grad, sum_grad_centred);
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* inv = invstd.data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    // grad_x = scale * g_relu - scale * mean(g_relu) - slope * (x - mean), as x * k1 + k0.
    std::vector<scalar_t> scale(channels), k1(channels), k0(channels);
    for (int64_t ch = 0; ch < channels; ++ch) {
      const double s = static_cast<double>(w[ch]) * inv[ch];
      const double slope = s * inv[ch] * inv[ch] * sum_grad_centred[ch] / rows;
      scale[ch] = static_cast<scalar_t>(s);
      k1[ch] = static_cast<scalar_t>(-slope);
      k0[ch] = static_cast<scalar_t>(-s * sum_grad[ch] / rows + slope * m[ch]);
      gw[ch] = static_cast<scalar_t>(sum_grad_centred[ch] * inv[ch]);
      gb[ch] = static_cast<scalar_t>(sum_grad[ch]);
    }
    std::vector<scalar_t*> grads;
    for (auto& result : results) {
      grads.push_back(result.data_ptr<scalar_t>());
    }
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for_units(begin, end, per_sequence, [&](int64_t, int64_t n, int64_t i) {
        for (size_t p = 0; p < layout.data.size(); ++p) {
          const int64_t width = layout.width[p], o = layout.offset[p];
          const scalar_t* xp = layout.data[p];
          const scalar_t* a = scale.data() + o;
          const scalar_t* c1 = k1.data() + o;
          const scalar_t* c0 = k0.data() + o;
          scalar_t* dp = grads[p];
          for_unit(n, i, p, [&](int64_t r, int64_t ch, scalar_t gv) {
            dp[r * width + ch] = gv * a[ch] + (xp[r * width + ch] * c1[ch] + c0[ch]);
          });
        }
      });
    });
  });
  results.push_back(grad_weight);
  results.push_back(grad_bias);
  return results;
}

// ---------------------------------------------------------------------------------------------
// Max pooling over the time axis of channels-last (N, T, C) tensors, without index tensors: the
// backward passes find the winner again from the input, with PyTorch's tie rule (the first
// maximum of the window wins). A NaN wins the forward maximum, as in PyTorch; the backward
// passes give NaN windows no special treatment (their gradients are not finite anyway).

// MaxPool(3, stride 1, padding 1) forward over (N, T, C).
at::Tensor max_pool3_forward(const at::Tensor& x) {
  check_cpu_contiguous(x, "x");
  const int64_t batch = x.size(0), steps = x.size(1), channels = x.size(2);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool3_forward", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * steps, row_grain(channels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row % steps;
        const scalar_t* centre = in + row * channels;
        const scalar_t* before = t > 0 ? centre - channels : centre;
        const scalar_t* after = t + 1 < steps ? centre + channels : centre;
        scalar_t* dst = y + row * channels;
        _Pragma("omp simd")
        for (int64_t c = 0; c < channels; ++c) {
          dst[c] = pair_max(pair_max(before[c], centre[c]), after[c]);
        }
      }
    });
  });
  return out;
}

// MaxPool(3, stride 1, padding 1) backward: each output's gradient goes to the first maximum of
// its window (t - 1, t, t + 1), as in PyTorch. Written as a gather: step t collects from the
// windows centred at t - 1, t and t + 1 that chose it, so every row is written once.
// With `into` given, the gradient is added to it (and it is returned): an Inception block's input
// also receives the gradients of its 1x1 convs, and this saves a separate addition pass.
at::Tensor max_pool3_backward(const at::Tensor& grad_out, const at::Tensor& x,
                              c10::optional<at::Tensor> into) {
  check_cpu_contiguous(grad_out, "grad_out");
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out shape mismatch");
  const int64_t batch = x.size(0), steps = x.size(1), channels = x.size(2);
  const bool accumulate = into.has_value() && into->defined();
  if (accumulate) {
    check_cpu_contiguous(*into, "into");
    TORCH_CHECK(into->numel() == x.numel() && into->scalar_type() == x.scalar_type(),
                "into must match x");
  }
  auto grad_in = accumulate ? *into : at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool3_backward", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* d = grad_in.data_ptr<scalar_t>();
    // The padding: below every finite input.
    const scalar_t lowest = std::numeric_limits<scalar_t>::lowest();
    at::parallel_for(0, batch * steps, row_grain(channels), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> padding(channels, lowest), no_grad(channels, scalar_t(0));
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row % steps;
        const scalar_t* pad = padding.data();
        // Inputs at t - 2 .. t + 2 (the padding outside the sequence) and the gradients of the
        // windows centred at t - 1, t, t + 1 (zero outside).
        const scalar_t* x0 = in + row * channels;
        const scalar_t* xm1 = t >= 1 ? x0 - channels : pad;
        const scalar_t* xm2 = t >= 2 ? x0 - 2 * channels : pad;
        const scalar_t* xp1 = t + 1 < steps ? x0 + channels : pad;
        const scalar_t* xp2 = t + 2 < steps ? x0 + 2 * channels : pad;
        const scalar_t* g0 = g + row * channels;
        const scalar_t* gm1 = t >= 1 ? g0 - channels : no_grad.data();
        const scalar_t* gp1 = t + 1 < steps ? g0 + channels : no_grad.data();
        scalar_t* dst = d + row * channels;
        _Pragma("omp simd")
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t v = x0[c];
          // Earlier positions win ties: t must beat earlier ones strictly, later ones or equal.
          // (& rather than &&: no short-circuit branches, so the loop vectorises.)
          const scalar_t before = xm1[c], after = xp1[c];
          const bool from_before = (v > xm2[c]) & (v > before);  // window (t - 2, t - 1, t)
          const bool from_centre = (v > before) & (v >= after);  // window (t - 1, t, t + 1)
          const bool from_after = (v >= after) & (v >= xp2[c]);  // window (t, t + 1, t + 2)
          const scalar_t sum_before = from_before ? gm1[c] : scalar_t(0);
          const scalar_t sum_centre = from_centre ? g0[c] : scalar_t(0);
          const scalar_t sum_after = from_after ? gp1[c] : scalar_t(0);
          const scalar_t total = sum_before + sum_centre + sum_after;
          dst[c] = accumulate ? dst[c] + total : total;
        }
      }
    });
  });
  return grad_in;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gru_forward", &gru_forward, "GRU layer forward over all steps (CPU)");
  m.def("gru_backward", &gru_backward, "GRU layer backward over all steps (CPU)");
  m.def("batch_norm_relu_forward", &batch_norm_relu_forward,
        "BatchNorm + ReLU forward, optionally with MaxPool(2) over time (CPU)");
  m.def("batch_norm_relu_backward", &batch_norm_relu_backward,
        "BatchNorm + ReLU backward, optionally from the pooled gradient (CPU)");
  m.def("max_pool3_forward", &max_pool3_forward, "MaxPool(3, 1, 1) over time (CPU)");
  m.def("max_pool3_backward", &max_pool3_backward, "MaxPool(3, 1, 1) over time, backward (CPU)");
}
