"""A GRU for CPUs: a backward pass built for throughput, and fused time loops.

``nn.GRU`` on a CPU is fast going forward (the input projection of all time steps is one matrix
product, then one small product per step), but its backward pass goes through autograd op by op:
every step accumulates its own small weight-gradient product, and with 456 sequences of 250 steps
(the reference batch) that backward takes three times the forward. Here the forward pass keeps
what the backward needs (gates, the recurrent candidate term, the states), the backward walks the
steps with one product per step (the gradient flowing to the previous state), and the weight
gradients, the bias gradients and the gradient of the input are each a single large product or
sum over all steps afterwards. The time loops themselves run in leadtune's fused C++ kernels
(``kernels.py``: one pass over memory per step for the gate arithmetic); where those cannot be
built, the same loops run as PyTorch ops.

The function is PyTorch's GRU (gate order r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h +
b_hn))``; ``h' = (1 - z) * n + z * h``), on the parameters of an ``nn.GRU`` module, so state
dicts and checkpoints are unchanged. ``tests/test_fast_path.py`` checks outputs and every
gradient against ``nn.GRU`` in float64. It is used on CPUs only: in training (``gru_layers``)
and, on the fused kernels, in inference without autograd (``gru_inference``). On a GPU cuDNN's GRU
is the fast path, and under TorchScript, ONNX or ``torch.export`` tracing ``nn.GRU`` runs, so
exported models contain only standard operators.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leadtune.trainables.lead_id.models import kernels


class GRULayer(torch.autograd.Function):
    """One unidirectional GRU layer over a time-major ``(T, N, C)`` input from a zero state.

    ``forward(x, w_ih, w_hh, b_ih, b_hh) -> (T, N, H)`` states, time-major and contiguous.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:  # type: ignore[override]
        fused = kernels.for_tensor(x)
        if fused is not None:
            saved = _fused_layer_forward(fused, x, w_ih, w_hh, b_ih, b_hh)
        else:
            saved = _forward_steps(x, w_ih, w_hh, b_ih, b_hh)
        states, reset_update, candidate, recurrent = saved
        ctx.save_for_backward(x, w_ih, w_hh, states, recurrent, reset_update, candidate)
        return states

    @staticmethod
    def backward(ctx, grad_states: Tensor):  # type: ignore[override]
        x, w_ih, w_hh, states, recurrent, reset_update, candidate = ctx.saved_tensors
        steps, batch, features = x.shape
        hidden = w_hh.shape[1]
        # Gradients of the pre-activations in column blocks [d a_n * r, d a_r, d a_z, d a_n]:
        # the first three are the gradient through W_hh h (gate order n, r, z), the last three
        # the gradient through W_ih x (order r, z, n). They differ only in the candidate block,
        # where the recurrent one is scaled by r.
        grad_gates = x.new_empty(steps, batch, 4 * hidden)
        grad_recurrent = grad_gates[:, :, : 3 * hidden]  # views: no copies
        grad_projected = grad_gates[:, :, hidden:]
        w_hh_nrz = torch.cat([w_hh[2 * hidden :], w_hh[: 2 * hidden]])
        fused = kernels.for_tensor(x)
        # Both walks also give the bias gradients: (grad_b_ih, grad_b_hh).
        walk = fused.gru_backward if fused is not None else _backward_steps
        bias_grads = walk(
            grad_states.contiguous(), states, recurrent, reset_update, candidate, w_hh_nrz,
            grad_gates,
        )  # fmt: skip
        grad_x = grad_w_ih = grad_w_hh = None
        grad_b_ih = bias_grads[0] if ctx.needs_input_grad[3] else None
        grad_b_hh = bias_grads[1] if ctx.needs_input_grad[4] else None
        if ctx.needs_input_grad[2] and steps > 1:
            # The first step's previous state is zero: it contributes nothing to dW_hh.
            grad_nrz = _weight_gradient(
                grad_recurrent[1:].reshape(-1, 3 * hidden), states[:-1].reshape(-1, hidden)
            )
            grad_w_hh = torch.cat([grad_nrz[hidden:], grad_nrz[:hidden]])
        elif ctx.needs_input_grad[2]:
            grad_w_hh = torch.zeros_like(w_hh)
        rows_projected = grad_projected.reshape(steps * batch, 3 * hidden)
        if ctx.needs_input_grad[1]:
            grad_w_ih = _weight_gradient(rows_projected, x.reshape(steps * batch, features))
        if ctx.needs_input_grad[0]:
            grad_x = (rows_projected @ w_ih).view(steps, batch, features)
        return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def _weight_gradient(grad_rows: Tensor, input_rows: Tensor) -> Tensor:
    """``grad_rows^T @ input_rows`` computed as ``(input_rows^T @ grad_rows)^T``, contiguous.

    The same numbers; for the GRU's shapes (K = 114,000 rows, a 128 x 384 result) MKL runs this
    orientation about 20 % faster."""
    return (input_rows.t() @ grad_rows).t().contiguous()


def _forward_steps(
    x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer as PyTorch ops (what ``_fused_layer_forward`` does on the fused kernel):
    (states, gates r|z, candidate n, W_hn h + b_hn)."""
    steps, batch, features = x.shape
    hidden = w_hh.shape[1]
    states = x.new_empty(steps, batch, hidden)
    reset_update = x.new_empty(steps, batch, 2 * hidden)  # sigmoid gates r, z
    candidate = x.new_empty(steps, batch, hidden)  # n
    # Input projections of every step at once, (T, N, 3H). The r and z blocks also take b_hh,
    # so that each step adds its recurrent product in place.
    bias = torch.cat([b_ih[: 2 * hidden] + b_hh[: 2 * hidden], b_ih[2 * hidden :]])
    projected = torch.addmm(bias, x.reshape(steps * batch, features), w_ih.t())
    projected = projected.view(steps, batch, 3 * hidden)
    # W_hn h + b_hn of every step, kept for the backward pass; starts as the bias.
    recurrent = b_hh[2 * hidden :].expand(steps, batch, hidden).contiguous()
    difference = states.new_empty(batch, hidden)
    w_rz_t = w_hh[: 2 * hidden].t()
    w_n_t = w_hh[2 * hidden :].t()
    for step in range(steps):
        pre_gates = projected[step, :, : 2 * hidden]
        previous = states[step - 1] if step > 0 else None
        if previous is not None:  # the initial state is zero: nothing to add
            pre_gates.addmm_(previous, w_rz_t)
            recurrent[step].addmm_(previous, w_n_t)
        gates = torch.sigmoid(pre_gates, out=reset_update[step])
        new = torch.addcmul(
            projected[step, :, 2 * hidden :],
            gates[:, :hidden],
            recurrent[step],
            out=candidate[step],
        )
        new.tanh_()
        if previous is not None:
            torch.sub(previous, new, out=difference)
            torch.addcmul(new, gates[:, hidden:], difference, out=states[step])
        else:  # h = n - z * n
            torch.addcmul(new, gates[:, hidden:], new, value=-1, out=states[step])
    return states, reset_update, candidate, recurrent


def _backward_steps(
    grad_states: Tensor,
    states: Tensor,
    recurrent: Tensor,
    reset_update: Tensor,
    candidate: Tensor,
    w_hh_nrz: Tensor,
    grad_gates: Tensor,
) -> tuple[Tensor, Tensor]:
    """The backward time loop in PyTorch ops (what the fused kernel ``gru_backward`` does):
    fills ``grad_gates`` (T, N, 4H) = [d a_n * r, d a_r, d a_z, d a_n] and returns the bias
    gradients (grad_b_ih, grad_b_hh)."""
    steps, batch, hidden = states.shape
    grad_candidate_out = states.new_empty(batch, hidden)
    carries = (states.new_empty(batch, hidden), states.new_empty(batch, hidden))
    sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
    tanh_backward = torch.ops.aten.tanh_backward.grad_input
    grad_state = grad_states[steps - 1]  # dL/dh of the step being walked
    for step in range(steps - 1, -1, -1):
        update = reset_update[step, :, hidden:]
        reset = reset_update[step, :, :hidden]
        new = candidate[step]
        grads = grad_gates[step]
        grad_reset_update = grads[:, hidden : 3 * hidden]  # dL/dr, dL/dz, then through sigmoid
        grad_reset, grad_update = grads[:, hidden : 2 * hidden], grads[:, 2 * hidden : 3 * hidden]
        grad_candidate = grads[:, 3 * hidden :]
        # h = n + z * (h_prev - n): dL/dz = dh * (h_prev - n), dL/dn = dh * (1 - z).
        if step > 0:
            torch.sub(states[step - 1], new, out=grad_update)
            grad_update.mul_(grad_state)
        else:  # the initial state is zero
            torch.mul(new, grad_state, out=grad_update).neg_()
        torch.addcmul(grad_state, grad_state, update, value=-1, out=grad_candidate_out)
        tanh_backward(grad_candidate_out, new, grad_input=grad_candidate)
        # n = tanh(a_n + r * (W_hn h + b_hn)): dL/dr = dn_pre * (W_hn h + b_hn).
        torch.mul(grad_candidate, recurrent[step], out=grad_reset)
        sigmoid_backward(grad_reset_update, reset_update[step], grad_input=grad_reset_update)
        torch.mul(grad_candidate, reset, out=grads[:, :hidden])
        if step == 0:
            break
        # dL/dh_prev: the direct path through z * h_prev, the next output's own gradient,
        # and the path through W_hh.
        carry = carries[step % 2]  # not the buffer grad_state may live in
        torch.addcmul(grad_states[step - 1], grad_state, update, out=carry)
        grad_state = carry.addmm_(grads[:, : 3 * hidden], w_hh_nrz)
    # b_hh receives [d a_r, d a_z, d a_n * r]; b_ih receives [d a_r, d a_z, d a_n].
    sums = grad_gates.sum((0, 1))
    grad_b_hh = torch.cat([sums[hidden : 3 * hidden], sums[:hidden]])
    return sums[hidden:], grad_b_hh


def _plain_configuration(gru: nn.GRU, sequence: Tensor) -> bool:
    """The GRU configuration this module implements, on a plain CPU tensor, outside any tracer."""
    return (
        sequence.device.type == "cpu"
        and gru.batch_first
        and gru.bias
        and not gru.bidirectional
        and gru.dropout == 0
        and gru.proj_size == 0
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def use_gru_layers(gru: nn.GRU, sequence: Tensor) -> bool:
    """Whether ``gru_layers`` should run ``gru`` on ``sequence``: CPU training with autograd on,
    for the plain configuration this module implements (unidirectional, biases, no dropout)."""
    return gru.training and torch.is_grad_enabled() and _plain_configuration(gru, sequence)


def use_gru_inference(gru: nn.GRU, sequence: Tensor) -> bool:
    """Whether ``gru_inference`` should run ``gru`` on ``sequence``: no autograd, a plain float
    CPU tensor (not a tracer's or exporter's fake tensor), and the fused kernels built."""
    return (
        not torch.is_grad_enabled()
        and type(sequence) is torch.Tensor
        and _plain_configuration(gru, sequence)
        and kernels.for_tensor(sequence) is not None
    )


def gru_layers(gru: nn.GRU, sequence: Tensor) -> Tensor:
    """All layers of ``gru`` over a batch-first ``(N, T, C)`` sequence from zero states.

    Returns the last layer's states time-major, ``(T, N, H)``: the same numbers as
    ``gru(sequence)[0].transpose(0, 1)``.
    """
    hidden = sequence.transpose(0, 1).contiguous()
    for weights in _layer_weights(gru):
        hidden = GRULayer.apply(hidden, *weights)
    return hidden


def gru_inference(gru: nn.GRU, sequence: Tensor) -> Tensor:
    """``gru_layers`` without autograd, on the fused kernels: ``(N, T, C) -> (T, N, H)``."""
    fused = kernels.load()
    hidden = sequence.transpose(0, 1).contiguous()
    for weights in _layer_weights(gru):
        hidden = _fused_layer_forward(fused, hidden, *weights)[0]
    return hidden


def _layer_weights(gru: nn.GRU) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    return [
        tuple(
            getattr(gru, f"{name}_l{layer}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        for layer in range(gru.num_layers)
    ]


def _fused_layer_forward(
    fused, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer on the fused kernel: (states, gates r|z, candidate n, W_hn h + b_hn)."""
    steps, batch, features = x.shape
    hidden = w_hh.shape[1]
    states = x.new_empty(steps, batch, hidden)
    reset_update = x.new_empty(steps, batch, 2 * hidden)
    candidate = x.new_empty(steps, batch, hidden)
    recurrent = x.new_empty(steps, batch, hidden)
    # The input products of every step at once (the kernel adds the biases), then per step one
    # product W_hh h and one fused pass for the gates.
    projected = torch.mm(x.reshape(steps * batch, features), w_ih.t())
    fused.gru_forward(
        projected.view(steps, batch, 3 * hidden), w_hh.contiguous(), b_ih.contiguous(),
        b_hh.contiguous(), states, reset_update, candidate, recurrent,
    )  # fmt: skip
    return states, reset_update, candidate, recurrent
