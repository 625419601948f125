// leadtune's fused CPU kernels, compiled on first use by trainables/models/kernels.py.
//
// Each function is one pass over memory for work that takes PyTorch's eager mode several
// elementwise kernels (and as many passes). They compute the same functions as the PyTorch code
// paths they replace; tests/test_fast_path.py checks both against PyTorch's modules in float64.
//
// GRU (PyTorch's formulation, gate order r, z, n):
//   r = sigmoid(a_r), z = sigmoid(a_z), n = tanh(a_n + r * (W_hn h + b_hn)), h' = n + z (h - n)
// where a_r, a_z already hold W_ir x + b_ir + b_hr + W_hr h (and likewise for z), and a_n holds
// W_in x + b_in.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>

namespace {

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
inline T tanh_by_exp(T x) {
  // tanh(x) = 2 sigmoid(2x) - 1; one exp, which the compiler vectorises.
  return T(2) / (T(1) + std::exp(T(-2) * x)) - T(1);
}

// Rows per parallel chunk: at least ~16k elements of work per thread.
inline int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width));
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// One GRU layer forward over all steps, from a zero initial state.
// projected: (T, N, 3H), the input projections (r and z blocks also hold b_hh); modified in place
//            (the r and z blocks receive W_h h).
// recurrent: (T, N, H), filled with b_hn on entry; receives W_hn h + b_hn.
// w_hh: (3H, H). Outputs (preallocated): states (T, N, H), gates (T, N, 2H) = [r, z],
// candidate (T, N, H) = n.
void gru_forward(at::Tensor projected, at::Tensor recurrent, const at::Tensor& w_hh,
                 at::Tensor states, at::Tensor gates, at::Tensor candidate) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &projected, &recurrent, &states, &gates, &candidate}) {
    check_cpu_contiguous(*t, "GRU buffer");
  }
  const int64_t steps = projected.size(0), batch = projected.size(1), hidden = states.size(2);
  const auto w_rz_t = w_hh.narrow(0, 0, 2 * hidden).t();
  const auto w_n_t = w_hh.narrow(0, 2 * hidden, hidden).t();
  for (int64_t step = 0; step < steps; ++step) {
    auto pre = projected.select(0, step);
    auto rec = recurrent.select(0, step);
    if (step > 0) {  // the initial state is zero: nothing to add at step 0
      const auto previous = states.select(0, step - 1);
      pre.narrow(1, 0, 2 * hidden).addmm_(previous, w_rz_t);
      rec.addmm_(previous, w_n_t);
    }
    AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "gru_forward", [&] {
      const scalar_t* p_all = pre.data_ptr<scalar_t>();
      const scalar_t* rec_all = rec.data_ptr<scalar_t>();
      const scalar_t* prev_all =
          step > 0 ? states.select(0, step - 1).data_ptr<scalar_t>() : nullptr;
      scalar_t* g_all = gates.select(0, step).data_ptr<scalar_t>();
      scalar_t* n_all = candidate.select(0, step).data_ptr<scalar_t>();
      scalar_t* h_all = states.select(0, step).data_ptr<scalar_t>();
      at::parallel_for(0, batch, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* p = p_all + b * 3 * hidden;
          const scalar_t* rec_b = rec_all + b * hidden;
          scalar_t* g = g_all + b * 2 * hidden;
          scalar_t* n_b = n_all + b * hidden;
          scalar_t* h = h_all + b * hidden;
          if (prev_all != nullptr) {
            const scalar_t* prev = prev_all + b * hidden;
_Pragma("omp simd")
            for (int64_t j = 0; j < hidden; ++j) {
              const scalar_t r = sigmoid(p[j]);
              const scalar_t z = sigmoid(p[hidden + j]);
              const scalar_t n = tanh_by_exp(p[2 * hidden + j] + r * rec_b[j]);
              g[j] = r;
              g[hidden + j] = z;
              n_b[j] = n;
              h[j] = n + z * (prev[j] - n);
            }
          } else {
_Pragma("omp simd")
            for (int64_t j = 0; j < hidden; ++j) {
              const scalar_t r = sigmoid(p[j]);
              const scalar_t z = sigmoid(p[hidden + j]);
              const scalar_t n = tanh_by_exp(p[2 * hidden + j] + r * rec_b[j]);
              g[j] = r;
              g[hidden + j] = z;
              n_b[j] = n;
              h[j] = n - z * n;
            }
          }
        }
      });
    });
  }
}

// One GRU layer backward over all steps (the matching forward is gru_forward).
// grad_states: (T, N, H) gradient of the loss with respect to every output state.
// Outputs (preallocated): grad_recurrent (T, N, 3H), the gradient of the pre-activations through
// W_hh h + b_hh ([d a_r, d a_z, d a_n * r]); grad_input_candidate (T, N, H), d a_n (through W_in x).
void gru_backward(const at::Tensor& grad_states, const at::Tensor& states,
                  const at::Tensor& recurrent, const at::Tensor& gates,
                  const at::Tensor& candidate, const at::Tensor& w_hh, at::Tensor grad_recurrent,
                  at::Tensor grad_input_candidate) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &grad_states, &states, &recurrent, &gates, &candidate, &grad_recurrent,
           &grad_input_candidate}) {
    check_cpu_contiguous(*t, "GRU buffer");
  }
  const int64_t steps = states.size(0), batch = states.size(1), hidden = states.size(2);
  auto grad_state = grad_states.select(0, steps - 1).clone();  // dL/dh of the step being walked
  auto carry = at::empty_like(grad_state);
  for (int64_t step = steps - 1; step >= 0; --step) {
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "gru_backward", [&] {
      const scalar_t* dh_all = grad_state.data_ptr<scalar_t>();
      const scalar_t* prev_all =
          step > 0 ? states.select(0, step - 1).data_ptr<scalar_t>() : nullptr;
      const scalar_t* next_grad_all =
          step > 0 ? grad_states.select(0, step - 1).data_ptr<scalar_t>() : nullptr;
      const scalar_t* g_all = gates.select(0, step).data_ptr<scalar_t>();
      const scalar_t* n_all = candidate.select(0, step).data_ptr<scalar_t>();
      const scalar_t* rec_all = recurrent.select(0, step).data_ptr<scalar_t>();
      scalar_t* gr_all = grad_recurrent.select(0, step).data_ptr<scalar_t>();
      scalar_t* gi_all = grad_input_candidate.select(0, step).data_ptr<scalar_t>();
      scalar_t* carry_all = carry.data_ptr<scalar_t>();
      at::parallel_for(0, batch, grain_rows(hidden), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* dh = dh_all + b * hidden;
          const scalar_t* g = g_all + b * 2 * hidden;
          const scalar_t* n_b = n_all + b * hidden;
          const scalar_t* rec_b = rec_all + b * hidden;
          const scalar_t* prev = prev_all != nullptr ? prev_all + b * hidden : nullptr;
          const scalar_t* next_grad = next_grad_all != nullptr ? next_grad_all + b * hidden : nullptr;
          scalar_t* gr = gr_all + b * 3 * hidden;
          scalar_t* gi = gi_all + b * hidden;
          scalar_t* c = carry_all + b * hidden;
_Pragma("omp simd")
          for (int64_t j = 0; j < hidden; ++j) {
            const scalar_t r = g[j], z = g[hidden + j], n = n_b[j], d = dh[j];
            const scalar_t h_prev = prev != nullptr ? prev[j] : scalar_t(0);
            const scalar_t grad_z = d * (h_prev - n) * z * (scalar_t(1) - z);
            const scalar_t grad_n = d * (scalar_t(1) - z) * (scalar_t(1) - n * n);
            const scalar_t grad_r = grad_n * rec_b[j] * r * (scalar_t(1) - r);
            gr[j] = grad_r;
            gr[hidden + j] = grad_z;
            gr[2 * hidden + j] = grad_n * r;
            gi[j] = grad_n;
            c[j] = d * z + (next_grad != nullptr ? next_grad[j] : scalar_t(0));
          }
        }
      });
    });
    if (step > 0) {  // dL/dh_prev = carry + (gradient of W_hh h_prev + b_hh) @ W_hh
      carry.addmm_(grad_recurrent.select(0, step), w_hh);
      std::swap(grad_state, carry);
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gru_forward", &gru_forward, "GRU layer forward over all steps (CPU)");
  m.def("gru_backward", &gru_backward, "GRU layer backward over all steps (CPU)");
}
