"""The lead-ID encoders' CPU training fast path: fused autograd functions and the helpers of the
channels-last Inception blocks.

Each piece computes exactly what a plain PyTorch rendering computes (``plain_reference.py``;
``tests/test_fast_path*.py`` compares them on real records and on the extremes real data holds:
saturation, spikes, flat leads) with fewer passes over memory: BatchNorm + ReLU over the
concatenated branches in one pass, max pooling that keeps its argmax, block inputs multiplied
once for all branches, attention pooling whose gradient lands time-major for the GRU. Where
leadtune's C++ kernels (``kernels.py``, ``cpu_kernels.cpp``) were built they do the work, else
PyTorch ops do. The modules that use these live in ``encoders.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leadtune.trainables.lead_id.models import kernels


class BatchNormReLUConcat(torch.autograd.Function):
    """Training-mode BatchNorm + ReLU of ``(M, c_i)`` pre-activations, concatenated to ``(M, sum c_i)``,
    optionally followed by MaxPool(2) over time.

    The same function as BatchNorm1d on batch statistics followed by ReLU (and ``max_pool1d(2)``),
    for activations in channels-last layout (one row per lead and time step). On leadtune's
    kernels, the forward pass is one statistics pass and one pass writing the output straight
    into place (when pooling, only the pooled output: the full-size one is never stored); the
    backward pass is one pass for the per-channel sums and one writing the gradients. It
    recomputes the output from the parts (with the forward's own scale, offset and fused
    multiply-add, so exactly) instead of reading it, and routes a pooled gradient to the larger
    of each pair itself.
    Without the kernels it runs on PyTorch ops: PyTorch's BatchNorm forward, and a backward whose
    per-channel sums are cascaded ``torch.sum`` reductions (PyTorch's own channels-last backward
    sums each channel sequentially in float32 over all ``M`` rows and drifts by up to 1 %).

    ``conv_bias`` is the bias of the convolutions that produced the parts, left out of them: in
    training mode BatchNorm subtracts the batch mean, so a per-channel shift changes nothing but
    the running mean, to which it is added here. Its gradient is therefore exactly zero (what
    autograd would return as rounding noise), and it is returned as zeros so that the optimiser
    still applies weight decay as it would.

    ``forward(eps, momentum, n_parts, steps, time_major, *parts, weight, bias, running_mean,
    running_var, conv_bias)``. With ``steps`` > 0 the rows are ``N`` sequences of ``steps`` and
    the result is the pooled ``(N, steps // 2, C)``, or its time-major ``(steps // 2, N, C)``
    with ``time_major``; with ``steps`` = 0 it is ``(M, C)``. The running statistics are updated
    in place, as ``F.batch_norm`` does.
    """

    @staticmethod
    def forward(
        ctx,
        eps: float,
        momentum: float,
        n_parts: int,
        steps: int,
        time_major: bool,
        *tensors: Tensor,
    ):  # type: ignore[override]
        parts = tensors[:n_parts]
        weight, bias, running_mean, running_var, conv_bias = tensors[n_parts:]
        rows, channels = parts[0].shape[0], sum(part.shape[1] for part in parts)
        pooled = _pooled_buffer(parts[0], rows, channels, steps, time_major)
        ctx.steps, ctx.time_major = steps, time_major
        fused = _fused_kernels(parts[0], parts)
        ctx.fused = fused is not None
        if fused is not None:
            # One statistics pass over all parts, one pass writing ReLU(BN(x)) (pooled: only
            # the pooled rows; the backward pass recomputes the rest from the parts).
            parts = tuple(part.contiguous() for part in parts)
            out = None if steps else parts[0].new_empty(rows, channels)
            mean, rstd, variance, scale, offset = fused.batch_norm_relu_forward(
                list(parts), weight.contiguous(), bias.contiguous(), eps, out,
                None if pooled is None else _batch_major(pooled, time_major), steps,
            )  # fmt: skip
            with torch.no_grad():  # as F.batch_norm updates them: unbiased variance
                running_mean.lerp_(mean + conv_bias, momentum)
                running_var.lerp_(
                    variance * (rows / (rows - 1)) if rows > 1 else variance, momentum
                )
            ctx.save_for_backward(mean, rstd, scale, offset, weight, *parts)
        else:
            out = parts[0].new_empty(rows, channels)
            mean, rstd = _batch_norm_relu_ops(
                parts, weight, bias, running_mean, running_var, momentum, eps, out
            )
            with torch.no_grad():  # the shift left out of the parts
                running_mean.add_(conv_bias, alpha=momentum)
            if pooled is not None:
                pairs = out.view(-1, steps, channels)[:, : steps // 2 * 2].unflatten(1, (-1, 2))
                torch.maximum(pairs[:, :, 0], pairs[:, :, 1], out=_batch_major(pooled, time_major))
            ctx.save_for_backward(mean, rstd, out, weight, *parts)
        return out if pooled is None else pooled

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        steps = ctx.steps
        if steps:
            grad = _batch_major(grad, ctx.time_major)
            if grad.stride(-1) != 1:
                grad = grad.contiguous()
        else:
            grad = grad.contiguous()
        if ctx.fused:  # one pass for the sums, one for the input gradients
            mean, rstd, scale, offset, weight, *parts = ctx.saved_tensors
            *grad_parts, grad_weight, grad_bias = kernels.load().batch_norm_relu_backward(
                grad, parts, mean, rstd, scale, offset, weight.contiguous(), steps
            )
        else:
            mean, rstd, out, weight, *parts = ctx.saved_tensors
            if steps:
                grad = _pair_max_backward_ops(grad, out.view(-1, steps, out.shape[1]))
            grad_parts, grad_weight, grad_bias = _batch_norm_relu_backward_ops(
                grad.view_as(out), out, parts, mean, rstd, weight
            )
        grad_shift = torch.zeros_like(weight) if ctx.needs_input_grad[-1] else None
        return (None,) * 5 + (*grad_parts, grad_weight, grad_bias, None, None, grad_shift)


def _pooled_buffer(
    like: Tensor, rows: int, channels: int, steps: int, time_major: bool
) -> Tensor | None:
    """The pooled output's storage: ``(N, steps // 2, C)``, or ``(steps // 2, N, C)``."""
    if not steps:
        return None
    sequences = rows // steps
    shape = (steps // 2, sequences, channels) if time_major else (sequences, steps // 2, channels)
    return like.new_empty(shape)


def _batch_major(pooled: Tensor, time_major: bool) -> Tensor:
    """``(N, W, C)`` view of a pooled tensor stored time-major or batch-major."""
    return pooled.transpose(0, 1) if time_major else pooled


def _batch_norm_relu_ops(
    parts: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """BatchNorm + ReLU forward on PyTorch ops, written into ``out``; returns (mean, invstd)."""
    means, rstds, start = [], [], 0
    for part in parts:
        stop = start + part.shape[1]
        # One channel: the same numbers as one long (1, 1, M) sequence, for which PyTorch's
        # contiguous kernel is several times faster than its channels-last one.
        normalised, mean, rstd = torch.native_batch_norm(
            part.view(1, 1, -1) if part.shape[1] == 1 else part,
            weight[start:stop],
            bias[start:stop],
            running_mean[start:stop],
            running_var[start:stop],
            True,
            momentum,
            eps,
        )
        torch.clamp_min(normalised.view_as(part), 0, out=out[:, start:stop])
        means.append(mean)
        rstds.append(rstd)
        start = stop
    return torch.cat(means), torch.cat(rstds)


def _batch_norm_relu_backward_ops(
    grad_out: Tensor,
    out: Tensor,
    parts: Sequence[Tensor],
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """BatchNorm + ReLU backward on PyTorch ops: (part gradients, grad_weight, grad_bias)."""
    rows = out.shape[0]
    grad_parts, grad_weights, grad_biases, start = [], [], [], 0
    for part in parts:
        stop = start + part.shape[1]
        grad_y = torch.ops.aten.threshold_backward(grad_out[:, start:stop], out[:, start:stop], 0)
        centered = part - mean[start:stop]
        sum_grad = grad_y.sum(0, dtype=mean.dtype)
        sum_grad_centered = (grad_y * centered).sum(0, dtype=mean.dtype)
        channel_rstd = rstd[start:stop]
        scale = weight[start:stop] * channel_rstd
        slope = scale * channel_rstd * channel_rstd * sum_grad_centered / rows
        grad_part = torch.addcmul(-scale * sum_grad / rows, grad_y, scale)
        grad_parts.append(grad_part.addcmul_(centered, slope, value=-1).to(part.dtype))
        grad_weights.append(sum_grad_centered * channel_rstd)
        grad_biases.append(sum_grad)
        start = stop
    return (
        grad_parts,
        torch.cat(grad_weights).to(weight.dtype),
        torch.cat(grad_biases).to(weight.dtype),
    )


def _pair_max_backward_ops(grad_out: Tensor, x: Tensor) -> Tensor:
    """MaxPool(2) over time of ``(N, T, C)``, backward on PyTorch ops: each gradient goes to the
    larger of its pair (the first on a tie, as PyTorch's pooling does); an odd last step gets 0."""
    batch, steps, channels = x.shape
    windows = steps // 2
    pairs = x[:, : windows * 2].view(batch, windows, 2, channels)
    first_wins = pairs[:, :, 0] >= pairs[:, :, 1]
    grad_in = x.new_empty(x.shape)
    grad_pairs = grad_in[:, : windows * 2].view(batch, windows, 2, channels)
    # g * mask, then g - g * mask (exactly g or 0): two passes, faster than torch.where.
    torch.mul(grad_out, first_wins, out=grad_pairs[:, :, 0])
    torch.sub(grad_out, grad_pairs[:, :, 0], out=grad_pairs[:, :, 1])
    if steps % 2:
        grad_in[:, -1].zero_()
    return grad_in


# The fused BatchNorm kernels vectorise over channels; narrower parts (the one-channel
# bottlenecks of the first block) are faster through PyTorch's own kernels.
FUSED_MIN_CHANNELS = 8


def _fused_kernels(like: Tensor, parts: Sequence[Tensor] = ()):
    """leadtune's compiled CPU kernels for tensors like ``like`` (and, for BatchNorm, ``parts``
    of at least ``FUSED_MIN_CHANNELS`` channels each), or None: use PyTorch ops."""
    if any(part.shape[1] < FUSED_MIN_CHANNELS or part.dtype != like.dtype for part in parts):
        return None
    return kernels.for_tensor(like)


def batch_norm_relu(
    parts: list[Tensor],
    norms: list[nn.BatchNorm1d],
    conv_biases: list[Tensor],
    pool_steps: int = 0,
    time_major: bool = False,
) -> Tensor:
    """ReLU(BatchNorm(concatenation of ``parts`` + ``conv_biases``)) with the channels of
    ``norms`` in order, optionally followed by MaxPool(2) over time.

    ``parts`` are ``(M, c_i)`` channels-last pre-activations without their convolutions' biases,
    which are given apart (see ``BatchNormReLUConcat``). In training mode the batch statistics
    are used and every module's running statistics and batch count are updated exactly as
    ``nn.BatchNorm1d`` would; in eval mode the running statistics are used. With ``pool_steps``
    (training mode only) the rows are sequences of that length and the result is pooled:
    ``(N, pool_steps // 2, C)``, a view of time-major memory with ``time_major``.
    """
    first = norms[0]
    weight = torch.cat([norm.weight for norm in norms])
    bias = torch.cat([norm.bias for norm in norms])
    running_mean = torch.cat([norm.running_mean for norm in norms])
    running_var = torch.cat([norm.running_var for norm in norms])
    shift = torch.cat(conv_biases)
    if not first.training:
        if pool_steps:
            raise ValueError("batch_norm_relu pools in training mode only")
        scale = weight * (running_var + first.eps).rsqrt()
        offset = bias + (shift - running_mean) * scale
        return torch.addcmul(offset, torch.cat(parts, dim=1), scale).relu_()
    for norm in norms:
        norm.num_batches_tracked.add_(1)
    momentum = 1.0 / float(first.num_batches_tracked) if first.momentum is None else first.momentum
    out = BatchNormReLUConcat.apply(
        first.eps, momentum, len(parts), pool_steps, time_major, *parts, weight, bias,
        running_mean, running_var, shift,
    )  # fmt: skip
    with torch.no_grad():
        start = 0
        for norm in norms:
            stop = start + norm.num_features
            norm.running_mean.copy_(running_mean[start:stop])
            norm.running_var.copy_(running_var[start:stop])
            start = stop
    return _batch_major(out, time_major) if pool_steps else out


def folded_linear(conv: nn.Conv1d, norm: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """Weight ``(out, in * k)`` and bias of ``conv`` followed by ``norm`` on running statistics.

    For eval mode: BatchNorm with fixed statistics is a per-channel affine map, so it folds into
    the convolution before it (equal up to float rounding).
    """
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    weight = conv.weight.flatten(1) * scale[:, None]
    return weight, (conv.bias - norm.running_mean) * scale + norm.bias


def as_channels_last_4d(rows: Tensor, batch: int) -> Tensor:
    """``(N * T, C)`` rows -> the same memory as an ``(N, C, 1, T)`` channels-last tensor."""
    return rows.view(batch, -1, rows.shape[1]).permute(0, 2, 1).unsqueeze(2)


def rows_of(channels_last: Tensor) -> Tensor:
    """``(N, C, 1, T)`` channels-last tensor -> ``(N * T, C)`` rows (a view when contiguous)."""
    return channels_last.permute(0, 2, 3, 1).reshape(-1, channels_last.shape[1])


def max_pool_time(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """MaxPool1d over the time axis of an ``(N, T, C)`` tensor, returning ``(N, T', C)``.

    Runs as a channels-last 2D pooling: vectorised over channels, and its indices cost a few
    percent of the (N, C, T) kernel's (which dominated the reference's encoder time). In training,
    the Inception stack pools inside its BatchNorm + ReLU instead (``batch_norm_relu``).
    """
    batch, steps, channels = x.shape
    training = x.requires_grad and torch.is_grad_enabled()
    if kernel_size == stride and padding == 0 and not training:
        # Inference: no indices to keep, and a reduction over windows is faster still.
        windows = steps // stride
        return x[:, : windows * stride].view(batch, windows, stride, channels).amax(dim=2)
    pooled = F.max_pool2d(
        x.permute(0, 2, 1).unsqueeze(2), (1, kernel_size), (1, stride), (0, padding)
    )
    return pooled.squeeze(2).permute(0, 2, 1)


def max_pool3_rows(rows: Tensor, batch: int) -> Tensor:
    """MaxPool(3, stride 1, padding 1) over time of ``(N * T, C)`` rows, returning rows.

    Without autograd on a plain CPU tensor this runs on leadtune's kernel; otherwise as PyTorch's
    channels-last pooling. (In training, ``BlockInputProducts`` pools with the kernel itself.)
    """
    fused = _fused_kernels(rows)
    if (
        fused is not None
        and not (rows.requires_grad and torch.is_grad_enabled())
        and type(rows) is torch.Tensor  # not a tracer's or exporter's fake tensor
        and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
    ):
        return fused.max_pool3_forward(rows.view(batch, -1, rows.shape[1]).contiguous()).view_as(
            rows
        )
    return rows_of(F.max_pool2d(as_channels_last_4d(rows, batch), (1, 3), (1, 1), (0, 1)))


class BlockInputProducts(torch.autograd.Function):
    """The four 1x1 convs that read an Inception block's input, without biases, for training.

    ``forward(batch, rows, w_pointwise, w_kernel5, w_kernel11, w_pooled)``: ``rows`` is the
    ``(M, C)`` input, each weight ``(out_i, C)``; returns ``rows @ w_i^T`` for the pointwise conv
    and the two bottlenecks, and ``maxpool3(rows) @ w_pooled^T`` for the pooled branch. The same
    numbers as four separate products, but the backward pass sums the input gradient inside the
    matrix products (``addmm_`` into one buffer) and the pooling's gradient inside its kernel,
    instead of autograd's separate addition passes over the input-sized gradients.
    """

    @staticmethod
    def forward(ctx, batch: int, rows: Tensor, *weights: Tensor):  # type: ignore[override]
        pooled = max_pool3_rows(rows.detach(), batch)
        sources = (rows, rows, rows, pooled)
        ctx.batch = batch
        ctx.save_for_backward(rows, pooled, *weights)
        return tuple(torch.mm(source, weight.t()) for source, weight in zip(sources, weights))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        rows, pooled, *weights = ctx.saved_tensors
        grads = [g if g is None else g.contiguous() for g in grads]
        sources = (rows, rows, rows, pooled)
        grad_weights = [
            None if g is None or not needed else g.t() @ source
            for g, source, needed in zip(grads, sources, ctx.needs_input_grad[2:])
        ]
        grad_rows = None
        if ctx.needs_input_grad[1]:
            for g, weight in zip(grads[:3], weights[:3]):
                if g is None:
                    continue
                if grad_rows is None:
                    grad_rows = g @ weight
                else:
                    grad_rows.addmm_(g, weight)
            if grad_rows is None:
                grad_rows = torch.zeros_like(rows)
            if grads[3] is not None:
                _max_pool3_backward_into(grads[3] @ weights[3], rows, ctx.batch, grad_rows)
        return (None, grad_rows, *grad_weights)


def _max_pool3_backward_into(grad_pooled: Tensor, rows: Tensor, batch: int, into: Tensor) -> None:
    """Add the gradient of ``max_pool3_rows(rows)`` for ``grad_pooled`` to ``into``."""
    fused = _fused_kernels(rows)
    if fused is not None:
        sequences = rows.view(batch, -1, rows.shape[1])
        fused.max_pool3_backward(grad_pooled.view_as(sequences), sequences.contiguous(), into)
        return
    with torch.enable_grad():
        source = rows.detach().requires_grad_()
        pooled = max_pool3_rows(source, batch)
        (grad,) = torch.autograd.grad(pooled, source, grad_pooled)
    into.add_(grad)


def conv_rows(rows: Tensor, batch: int, weight: Tensor, bias: Tensor | None) -> Tensor:
    """'Same' Conv1d over time of ``(N * T, C)`` rows with an ``(out, C, k)`` weight (k odd),
    run as a channels-last 2D convolution; returns ``(N * T, out)`` rows."""
    padding = (0, weight.shape[-1] // 2)
    return rows_of(
        F.conv2d(as_channels_last_4d(rows, batch), weight.unsqueeze(2), bias, padding=padding)
    )


def time_windows(x: Tensor, taps: int) -> Tensor:
    """``(N, T, C) -> (N, T, C * taps)``: the zero-padded 'same' conv window of every time step,
    ordered like a Conv1d weight flattened to ``(out, C * taps)``."""
    batch, steps, _ = x.shape
    padded = F.pad(x, (0, 0, taps // 2, taps // 2))
    return padded.unfold(1, taps, 1).reshape(batch, steps, -1)


class TimeMajorAttentionPooling(torch.autograd.Function):
    """``AttentionPooling`` of a contiguous time-major ``(L, N, H)`` sequence, for training.

    ``forward(sequence, W, v) -> (N, H)``, the same numbers as the module's own forward. The
    backward pass writes the sequence's gradient time-major in one buffer: the pooling's term,
    then the projection's added inside its matrix product (``addmm_``), where autograd would
    return a batch-major term, add the two in a separate pass and leave the GRU a copy to make.
    """

    @staticmethod
    def forward(ctx, sequence: Tensor, projection: Tensor, score: Tensor) -> Tensor:  # type: ignore[override]
        steps, batch, hidden = sequence.shape
        rows = sequence.view(steps * batch, hidden)
        activation = torch.tanh(rows @ projection.t())
        weights = torch.softmax((activation @ score.t()).view(steps, batch), dim=0)
        ctx.save_for_backward(sequence, activation, weights, projection, score)
        # (N, 1, L) @ (N, L, H) with the batch as the middle axis of both operands.
        return torch.bmm(weights.t().unsqueeze(1), sequence.transpose(0, 1)).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        sequence, activation, weights, projection, score = ctx.saved_tensors
        steps, batch, hidden = sequence.shape
        rows = sequence.view(steps * batch, hidden)
        # d out / d weights[t, n] = sequence[t, n] . grad[n]
        grad_weights = torch.bmm(sequence.transpose(0, 1), grad.unsqueeze(2)).squeeze(2).t()
        grad_scores = weights * (grad_weights - (weights * grad_weights).sum(0, keepdim=True))
        grad_scores = grad_scores.reshape(steps * batch, 1)
        grad_projected = (grad_scores * score).mul_(1 - activation * activation)
        grad_sequence = None
        if ctx.needs_input_grad[0]:
            grad_sequence = weights.unsqueeze(2) * grad.unsqueeze(0)  # (L, N, H)
            grad_sequence.view(steps * batch, hidden).addmm_(grad_projected, projection)
        grad_projection = grad_projected.t() @ rows if ctx.needs_input_grad[1] else None
        grad_score = grad_scores.t() @ activation if ctx.needs_input_grad[2] else None
        return grad_sequence, grad_projection, grad_score
