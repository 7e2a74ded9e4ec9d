"""The state-space numerics of the BST SSM sublayer: the causal FFT convolution, the Vandermonde sums that form "s4"
kernels and carry states, and the block-end scan of "mf". Plain functions and `torch.autograd.Function`s with hand
written backward passes, each checked against a float64 reference in tests/test_fast_paths.py. Why each is shaped the
way it is (memory traffic on CPU, rounding at long lengths) is in docs/design.md.

Real dtypes: the SSM computes in float32 (float64 in a float64 model) whatever the model's dtype, see
`ssm_compute_dtype`.
"""

import math

import torch
import torch.nn.functional as F


def _zero_padded(values: torch.Tensor, size: int) -> torch.Tensor:
    """values (..., L) -> (..., size), zeros after L, contiguous. Every element is written once (torch.fft's own `n=`
    padding fills the whole buffer with zeros first, then copies the values over half of it)."""
    padded = values.new_empty(*values.shape[:-1], size)
    padded[..., : values.shape[-1]] = values
    padded[..., values.shape[-1] :].zero_()
    return padded


class CausalFFTConvolution(torch.autograd.Function):
    r"""y[b, d, c, t] = sum_{s <= t} k[d, c, t - s] u[b, d, s] + skip[d, c] u[b, d, t], with FFTs of size n >= 2L
    (zero padding makes the circular convolution the linear one on t < L), and its adjoints, also through real FFTs:

        forward:   Y = U K'                         y = irfft(Y)[:L]          K' = K with K'[0] = K[0] + skip
        backward:  grad_u = irfft(sum_c conj(K') G)[:L]       (correlation with the kernel)
                   grad_k = irfft(sum_b conj(U) G)[:L]        (correlation with the input),   G = rfft(grad_y)
                   grad_skip = grad_k[0]

    The skip term is tap 0 of the kernel, so it costs nothing here; as a separate `addcmul` it was one more pass over
    the (B, L, D, C) outputs and two over their gradient. Autograd through torch.fft would differentiate each rfft with
    a full complex FFT over zero-filled buffers; this backward is one rfft and two irffts (docs/design.md).

    The output is a (B, D, C, L) view of a (B, C, D, n) buffer: each filter's (D, L) plane is one block of memory, the
    layout in which "mh" attention reads filter h for head h (as (L, D) matrices, transposed in place). The products
    write that layout directly, so no pass is spent on it.
    """

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, kernel: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        length, kernel_length = inputs.shape[-1], kernel.shape[-1]
        fft_size = 1 << (2 * length - 1).bit_length()
        inputs_f = torch.fft.rfft(_zero_padded(inputs, fft_size))  # (B, D, F)
        padded_kernel = _zero_padded(kernel, fft_size)  # (D, C, n)
        if skip is not None:
            padded_kernel[..., 0] += skip
        kernel_f = torch.fft.rfft(padded_kernel)  # (D, C, F)
        ctx.save_for_backward(inputs_f, kernel_f)
        ctx.length, ctx.kernel_length, ctx.fft_size = length, kernel_length, fft_size
        batch, channels, filters, frequencies = inputs.shape[0], *kernel_f.shape
        outputs_f = inputs_f.new_empty(batch, filters, channels, frequencies)  # (B, C, D, F)
        # Into a contiguous `out=` (the operands transposed instead): torch.compile traces no other kind.
        torch.mul(inputs_f.unsqueeze(1), kernel_f.transpose(0, 1), out=outputs_f)
        return torch.fft.irfft(outputs_f, n=fft_size)[..., :length].transpose(1, 2)  # (B, D, C, L)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs_f, kernel_f = ctx.saved_tensors
        length, fft_size = ctx.length, ctx.fft_size
        grad_f = torch.fft.rfft(_zero_padded(grad_output.transpose(1, 2), fft_size))  # (B, C, D, F)
        grad_inputs = grad_kernel = grad_skip = None
        needs_skip_grad = len(ctx.needs_input_grad) > 2 and ctx.needs_input_grad[2]  # `skip` may be left out
        if ctx.needs_input_grad[0]:
            grad_inputs_f = (grad_f * kernel_f.transpose(0, 1).conj()).sum(1)  # (B, D, F)
            grad_inputs = torch.fft.irfft(grad_inputs_f, n=fft_size)[..., :length]
        if ctx.needs_input_grad[1] or needs_skip_grad:
            # Written as (D, C, F), the kernel's own layout: its gradient then reshapes to (D * C, L) without a copy.
            grad_kernel_f = kernel_f.new_empty(kernel_f.shape)
            if grad_f.shape[0] == 1:
                torch.mul(grad_f[0].transpose(0, 1), inputs_f[0].conj().unsqueeze(1), out=grad_kernel_f)
            else:
                torch.sum((grad_f * inputs_f.conj().unsqueeze(1)).transpose(1, 2), dim=0, out=grad_kernel_f)
            grad_taps = torch.fft.irfft(grad_kernel_f, n=fft_size)  # (D, C, n)
            grad_kernel = grad_taps[..., : ctx.kernel_length] if ctx.needs_input_grad[1] else None
            grad_skip = grad_taps[..., 0] if needs_skip_grad else None
        return grad_inputs, grad_kernel, grad_skip


COMPLEX_DTYPES = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def ssm_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the SSM and its FFTs compute in: float64 in a float64 model, float32 otherwise (bf16/fp16 lose
    the small, long-range taps that are the reason to have an SSM)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_fft_conv(inputs: torch.Tensor, kernel: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear convolution y[b, d, c, t] = sum_{s <= t} kernel[d, c, t - s] * inputs[b, d, s], plus
    skip[d, c] * inputs[b, d, t] when `skip` (D, C) is given.

    inputs (B, D, L), kernel (D, C, >= L) -> (B, D, C, L), in float32 (float64 when either operand is float64). FFTs
    run in fp32 even under autocast. The result is a view with filters outermost in memory (`CausalFFTConvolution`).
    """
    length = inputs.shape[-1]
    dtype = ssm_compute_dtype(torch.promote_types(inputs.dtype, kernel.dtype))
    skip = None if skip is None else skip.to(dtype)
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        return CausalFFTConvolution.apply(inputs.to(dtype), kernel[..., :length].to(dtype), skip)


def complex_exp(exponent: torch.Tensor) -> torch.Tensor:
    """exp(a + ib) = e^a (cos b + i sin b); three real kernels run faster on CPU than torch's complex exp."""
    return torch.polar(torch.exp(exponent.real), exponent.imag)


def scaled_complex_exp(log_z: torch.Tensor, scale: torch.Tensor, real_dtype: torch.dtype) -> torch.Tensor:
    """z^scale = exp(scale * log z), complex with `real_dtype` parts, for large real `scale` (powers up to the length).

    The exponent is formed in float64 and its angle reduced modulo 2 pi before the cast: in float32 the phase
    scale * theta carries an error of ~6e-8 * scale * |theta| rad (1e-3 rad for a slow mode at 16k tokens), and that
    is the kernel's relative error. After the reduction the cast costs at most ~4e-7 rad at any length. The
    exponentials themselves run in `real_dtype`, so autograd saves no float64 tables.
    """
    log_magnitude = (log_z.real.double() * scale).to(real_dtype)
    angle = torch.remainder(log_z.imag.double() * scale, 2 * math.pi).to(real_dtype)
    return torch.polar(torch.exp(log_magnitude), angle)


class ComplexPowers(torch.autograd.Function):
    """z^scale = `scaled_complex_exp(log_z, scale, real_dtype)`, `scale` real and not differentiated, with a one-pass
    backward: d z^s / d log z = s z^s, so grad log z = sum over the broadcast of s conj(z^s) grad (holomorphic).

    Autograd through `scaled_complex_exp` takes about ten passes over the power table (polar, exp, casts, remainder,
    products); the tables are the largest tensors of "s4" kernel generation, and that backward was most of its time.
    """

    @staticmethod
    def forward(ctx, log_z: torch.Tensor, scale: torch.Tensor, real_dtype: torch.dtype) -> torch.Tensor:
        powers = scaled_complex_exp(log_z, scale, real_dtype)
        ctx.save_for_backward(powers, scale)
        ctx.log_z_shape, ctx.log_z_dtype = log_z.shape, log_z.dtype
        return powers

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_powers: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        powers, scale = ctx.saved_tensors
        grad_log_z = grad_powers * powers.conj() * scale.to(powers.real.dtype)
        return grad_log_z.sum_to_size(ctx.log_z_shape).to(ctx.log_z_dtype), None, None


def _power_ladder(log_z: torch.Tensor, step: int, count: int) -> torch.Tensor:
    """z^(step*k) for k in [0, count) on a new dim 1, complex128, for a small `count`: exp(step log z) once, then a
    cumulative product, whose float64 roundings (~count * 1e-16) stay far below float32's."""
    base = complex_exp(step * log_z.to(torch.complex128)).unsqueeze(1)
    ladder = torch.cumprod(base.expand(-1, count - 1, *base.shape[2:]), dim=1)
    return torch.cat([torch.ones_like(base), ladder], dim=1)


class PowerTable(torch.autograd.Function):
    """z^i for i in [0, count) on a new dim 1: log_z (H, *rest) -> (H, count, *rest), complex with `real_dtype` parts.

    The "mf" block scan's matmul operand, as large as the matmul's output: `ComplexPowers` on it is several passes
    (float64 phase, reduction mod 2 pi, cast, exp, polar), and those passes were most of the scan's time. With
    i = q*i1 + i2 (q ~ sqrt(count)) the table is one product z^(q*i1) * z^i2 of two small float64 tables
    (`_power_ladder`); after their cast it adds one rounding of `real_dtype` (~1e-7 relative in float32, as the cast
    of `scaled_complex_exp`'s reduced phase).

    Backward: grad log z = sum_i i conj(z^i) grad_i (as `ComplexPowers`), regrouped by the split so that no table-size
    conjugate is formed: with Y_e(i1) = sum_i2 e(i2) conj(z^i2) grad_(i1, i2) for e = 1 and e = i2 (one elementwise
    product, then one matmul with the two weight rows), grad log z = sum_i1 conj(z^(q*i1)) (q*i1 Y_1 + Y_i2).
    """

    @staticmethod
    def forward(ctx, log_z: torch.Tensor, count: int, real_dtype: torch.dtype) -> torch.Tensor:
        inner_count = max(1, math.isqrt(count - 1) + 1)
        # An exact factorisation when one is near sqrt(count) (128 = 8 * 16): no unused tail to pad in backward.
        inner_count = next((q for q in range(inner_count, inner_count // 2, -1) if count % q == 0), inner_count)
        outer_count = -(-count // inner_count)
        complex_dtype = COMPLEX_DTYPES[real_dtype]
        inner = _power_ladder(log_z, 1, inner_count).to(complex_dtype)  # z^i2, (H, q, *rest)
        outer = _power_ladder(log_z, inner_count, outer_count).to(complex_dtype)  # z^(q*i1), (H, p, *rest)
        ctx.save_for_backward(inner, outer)
        ctx.count, ctx.log_z_dtype = count, log_z.dtype
        return (outer.unsqueeze(2) * inner.unsqueeze(1)).flatten(1, 2)[:, :count]  # (H, count, *rest)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_powers: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        inner, outer = ctx.saved_tensors
        heads, inner_count, *rest = inner.shape
        outer_count = outer.shape[1]
        if ctx.count < outer_count * inner_count:  # the table's unused tail, zero (F.pad would copy even for none)
            grad_powers = F.pad(grad_powers, [0, 0] * len(rest) + [0, outer_count * inner_count - ctx.count])
        grad_powers = grad_powers.reshape(heads, outer_count, inner_count, *rest)
        products = grad_powers * inner.conj().resolve_conj().unsqueeze(1)  # (H, p, q, *rest)
        exponents = torch.arange(inner_count, device=inner.device, dtype=inner.real.dtype)
        sum_weights = torch.stack([torch.ones_like(exponents), exponents])  # (2, q)
        sums = sum_weights @ torch.view_as_real(products).reshape(heads * outer_count, inner_count, -1)
        sums = torch.view_as_complex(sums.view(heads, outer_count, 2, *rest, 2))  # Y_1, Y_i2: (H, p, 2, *rest)
        outer_exponents = inner_count * torch.arange(outer_count, device=inner.device, dtype=inner.real.dtype)
        combined = outer_exponents.view(-1, *[1] * len(rest)) * sums[:, :, 0] + sums[:, :, 1]
        grad_log_z = (outer.conj() * combined).sum(1)
        return grad_log_z.to(ctx.log_z_dtype), None, None


class WeightedSum(torch.autograd.Function):
    """sum_j x[:, :, j] w[:, j]: x (H, R, J, X), w (H, J, X) complex -> (H, R, X), with J in-place multiply-adds.

    x is the "mf" block scan's matmul output and J small: the plain product-then-sum writes, reads and, in its
    backward, conjugates an x-size temporary more than once. Backward: grad x = grad conj(w) (the matmul's gradient,
    written once); grad w = sum_r conj(x_r) grad_r, R multiply-adds into a w-size sum, or J products and sums when
    J < R (many rows: a long batch).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        total = x[:, :, 0] * w[:, None, 0]
        for j in range(1, x.shape[2]):
            total.addcmul_(x[:, :, j], w[:, None, j])
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        grad_x = grad.unsqueeze(2) * w.conj().resolve_conj().unsqueeze(1)
        grad_conj = grad.conj().resolve_conj()
        rows, terms = x.shape[1:3]
        if rows <= terms:  # sum_r x_r conj(grad_r), conjugated once at the end; the shorter loop of the two
            conj_grad_w = torch.zeros_like(w)
            for r in range(rows):
                conj_grad_w.addcmul_(x[:, r], grad_conj[:, r, None])
        else:
            conj_grad_w = torch.stack([(x[:, :, j] * grad_conj).sum(1) for j in range(terms)], dim=1)
        return grad_x, conj_grad_w.conj()


class BlockStateScan(torch.autograd.Function):
    """The block-end states s_k = a_k s_(k-1) + x_k, s_(-1) = 0: x (H, B, N, X), a (H, N, X) complex -> s like x.

    N steps that write into one output (no per-step tensors, stack or conjugate copies as autograd through the loop
    makes). Backward, the reverse scan: grad x_k = grad s_k + conj(a_(k+1)) grad x_(k+1), and
    grad a_k = sum_b grad x_k conj(s_(k-1)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        states = torch.empty_like(x)
        states[:, :, 0] = x[:, :, 0]
        for k in range(1, x.shape[2]):  # in place: torch.compile traces no `out=` into a slice
            states[:, :, k].copy_(x[:, :, k]).addcmul_(a[:, None, k], states[:, :, k - 1])
        ctx.save_for_backward(a, states)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, states = ctx.saved_tensors
        conj_a = a.conj().resolve_conj()
        grad_x = torch.empty_like(states)
        grad_x[:, :, -1] = grad_states[:, :, -1]
        for k in range(states.shape[2] - 2, -1, -1):
            grad_x[:, :, k].copy_(grad_states[:, :, k]).addcmul_(conj_a[:, None, k + 1], grad_x[:, :, k + 1])
        grad_a = torch.zeros_like(a)
        grad_a[:, 1:] = (grad_x[:, :, 1:] * states[:, :, :-1].conj().resolve_conj()).sum(1)
        return grad_x, grad_a


def _split_powers(
    log_z: torch.Tensor, length: int, real_dtype: torch.dtype, low_count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Powers z^l for l in [0, length) split as l = b*j + i with b = `low_count` (default ~ sqrt(length)):
    low powers z^i (H, N, b) and high powers z^(b*j) (H, J, N), so z^l = high[j] * low[i]."""
    low_count = low_count or max(1, math.isqrt(max(length - 1, 0)) + 1)
    high_count = -(-length // low_count)
    steps = torch.arange(max(low_count, high_count), device=log_z.device, dtype=torch.float64)
    low_powers = ComplexPowers.apply(log_z.unsqueeze(-1), steps[:low_count], real_dtype)  # (H, N, b)
    high_steps = low_count * steps[:high_count, None]
    high_powers = ComplexPowers.apply(log_z.unsqueeze(-2), high_steps, real_dtype)  # (H, J, N)
    return low_powers, high_powers


def real_vandermonde_sum(coefficients: torch.Tensor, log_z: torch.Tensor, length: int) -> torch.Tensor:
    """Re(vandermonde_sum(coefficients, log_z, length)), real of the coefficients' real dtype: (..., H, N) -> (..., H,
    length).

    The same split l = b*j + i, z^l = z^(b*j) z^i, but only the real part is ever used (the kernel, the carried state),
    so the complex (J, N) by (N, b) matmul becomes one real (J, 2N) by (2N, b) matmul:

        Re(w z) = Re(w) Re(z) + Im(w) Im(conj z)

    The (J, N) complex table w z^(b*j) read as reals is the (J, 2N) left factor, and the powers of conj(z) read as reals
    the (b, 2N) right one: both are views. Real batched matmuls run much faster than complex ones on CPU.
    Both tables come from `PowerTable` (two small float64 factor tables and one product): exponentials, with their
    float64 exponents and angle reductions, were most of the kernel's time ("mh" at 4k: 128 per mode and channel).
    """
    low_count = math.isqrt(max(length - 1, 0)) + 1
    high_count = -(-length // low_count)
    real_dtype = coefficients.real.dtype
    high_powers = PowerTable.apply(low_count * log_z, high_count, real_dtype)  # (H, J, N): z^(b*j)
    weighted = coefficients.unsqueeze(-2) * high_powers  # (..., H, J, N)
    conj_low = PowerTable.apply(log_z.conj(), low_count, real_dtype)  # (H, b, N): conj(z)^i
    real_weighted = torch.view_as_real(weighted).flatten(-2)  # (..., H, J, 2N)
    real_low = torch.view_as_real(conj_low).flatten(-2)  # (H, b, 2N)
    return (real_weighted @ real_low.transpose(-1, -2)).flatten(-2)[..., :length]


def vandermonde_reduce(values: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """sum_l values[..., h, l] * z[h, n] ** l: (..., H, L) real -> (..., H, N) complex, with the same power split."""
    length = values.shape[-1]
    real_dtype = ssm_compute_dtype(values.dtype)
    low_powers, high_powers = _split_powers(log_z, length, real_dtype)
    low_count, high_count = low_powers.shape[-1], high_powers.shape[-2]
    values = F.pad(values.to(real_dtype), (0, low_count * high_count - length))
    values = values.unflatten(-1, (high_count, low_count)).to(low_powers.dtype)  # (..., H, J, b)
    inner = values @ low_powers.transpose(-1, -2)  # (..., H, J, N)
    return (inner * high_powers).sum(-2)


def block_end_scan(
    inputs: torch.Tensor, log_da: torch.Tensor, c_db: torch.Tensor, filters: int, block_size: int
) -> torch.Tensor:
    r""""s4" outputs at the block ends, (B, T, D) -> (B, N, D, C), through the state at each block end:

        s_k = dA^W_k s_(k-1) + C dB sum_i dA^(W_k-1-i) u_(k,i),   y_k = 2 Re(sum_n s_k)

    W_k = W, except for a partial last block (its tokens are read up to the chunk's last one). With the exponent
    W-1-i = b*j + i2 (b ~ sqrt(B T)), the block sums are

        sum_i dA^(W-1-i) u_(k,i) = sum_j dA^(b*j) [sum_i2 dA^i2 u_(k,j,i2)]

    the bracket one real matmul per channel, (B*N*J, b) by (b, S N) (`PowerTable`), then J multiply-adds with the
    C dB-weighted high powers (`WeightedSum`) and the scan over blocks (`BlockStateScan`). The power table and the
    matmul output stay at ~sqrt(B T) x (S N) per channel instead of W x (S N). On CPU the time is memory traffic
    over those two tensors (D S N/2 sqrt(B T) complex, 33M at 4k), so each step writes each of them once and
    reads it as few times as it can, in the forward and in the backward.
    """
    batch, length, channels = inputs.shape
    dtype = inputs.dtype
    num_blocks = -(-length // block_size)
    last_size = length - (num_blocks - 1) * block_size
    # The last block's tokens go to its end slots, so that exponent W-1-i counts from the chunk's last token.
    gap = inputs.new_zeros(batch, block_size - last_size, channels)
    split = (num_blocks - 1) * block_size
    blocks = torch.cat([inputs[:, :split], gap, inputs[:, split:]], dim=1).view(batch, num_blocks, block_size, -1)
    modes = log_da.shape[-1]
    log_da, c_db = log_da.view(channels, filters, modes), c_db.view(channels, filters, modes)
    low_count = min(block_size, max(1, math.isqrt(batch * length)))
    high_count = -(-block_size // low_count)
    # Exponent e = W-1-i = b*j + i2: reverse the slots, pad to J*b, and put each channel's (B*N*J, b) rows first.
    exponent_major = F.pad(blocks.flip(2), (0, 0, 0, high_count * low_count - block_size))
    rows = exponent_major.view(-1, low_count, channels).permute(2, 0, 1).contiguous()  # (D, R = B*N*J, b)
    # The real matmul operand is the complex table's own memory, (Re, Im) of each filter's and mode's powers side
    # by side, (D, b, C*N/2*2): no permute, and the output views as complex (D, B, N, J, C, N/2) directly.
    low_powers = PowerTable.apply(log_da, low_count, dtype)  # z^i2, (D, b, C, N/2)
    inner = rows @ torch.view_as_real(low_powers).flatten(2)
    inner = torch.view_as_complex(inner.view(channels, batch * num_blocks, high_count, filters * modes, 2))
    high_powers = PowerTable.apply(low_count * log_da.flatten(1), high_count, dtype)  # z^(b*j), (D, J, C*N/2)
    weights = c_db.flatten(1).unsqueeze(1) * high_powers
    block_sums = WeightedSum.apply(inner, weights).view(channels, batch, num_blocks, -1)  # (D, B, N, C*N/2)
    # dA^W for whole blocks and dA^(W_last) for the last: two powers, not one table per block.
    steps = torch.tensor([block_size, last_size], device=inputs.device, dtype=torch.float64)
    decays = ComplexPowers.apply(log_da.flatten(1).unsqueeze(1), steps.view(-1, 1), dtype)  # (D, 2, C*N/2)
    decays = decays[:, [0] * (num_blocks - 1) + [1]]  # (D, N, C*N/2)
    states = BlockStateScan.apply(block_sums, decays)  # (D, B, N, C*N/2)
    return 2 * states.view(channels, batch, num_blocks, filters, modes).sum(-1).real.permute(1, 2, 0, 3)


def block_end_convolution(inputs: torch.Tensor, taps: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Outputs at the block ends for any kernel, (B, T, D) -> (B, N, D, C). For a whole block k,

        y_k = sum_(q <= k) sum_i Kb[q, i] ub[k - q, i],   Kb[q, i] = K[qW + W-1-i],   ub[m, i] = u[mW + i]

    a convolution over the block axis with W-vector taps: FFTs of length 2 N_full along that axis and a sum over
    i. A partial last block is read at the chunk's last token: y = sum_s K[T-1-s] u[s], one dot product.
    """
    batch, length, channels = inputs.shape
    whole_blocks = length // block_size
    taps = taps.to(inputs.dtype)  # (D, C, T)
    ends = []
    if whole_blocks:
        fft_size = 2 * whole_blocks
        used = whole_blocks * block_size
        input_blocks = inputs[:, :used].view(batch, whole_blocks, block_size, channels)
        input_f = torch.fft.rfft(input_blocks, n=fft_size, dim=1).permute(3, 1, 2, 0)  # (D, F, W, B)
        tap_blocks = taps[..., :used].view(channels, taps.shape[1], whole_blocks, block_size).flip(-1)
        tap_f = torch.fft.rfft(tap_blocks.transpose(1, 2), n=fft_size, dim=1)  # (D, F, C, W)
        ends.append(torch.fft.irfft(tap_f @ input_f, n=fft_size, dim=1)[:, :whole_blocks].permute(3, 1, 0, 2))
    if length > whole_blocks * block_size:
        last = torch.einsum("bsd,dcs->bdc", inputs, taps.flip(-1))  # y[T-1] = sum_s K[T-1-s] u[s]
        ends.append(last.unsqueeze(1))
    return torch.cat(ends, dim=1)  # (B, N, D, C)
