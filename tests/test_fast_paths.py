"""The fast SSM paths against straightforward references, in float64, values and gradients: "mf" block ends without
full-length outputs, the real-matmul "s4" kernel with its factored powers and one-pass power backward, the skip term
folded into the FFT convolution, the RMSNorm folded into the context projections, every variant and kernel end to
end."""

import pytest
import torch
from conftest import VARIANTS_AND_KERNELS, open_context_path, tiny_config

from modeling_bst import BSTForCausalLM
from modeling_bst.modeling_bst import (
    BlockLayout,
    BSTRMSNorm,
    BSTS4DKernel,
    BSTStateSpace,
    block_end_index,
    rms_normed_projection,
)
from modeling_bst.ssm_ops import (
    BlockStateScan,
    CausalFFTConvolution,
    ComplexPowers,
    PowerTable,
    WeightedSum,
    causal_fft_conv,
    real_vandermonde_sum,
    scaled_complex_exp,
)


def reference_block_ends(self, inputs, layout, layer_cache):
    """The straightforward "mf" path: the full-sequence FFT convolution, then the outputs at the block ends."""
    states = self(inputs, layout, layer_cache)  # (B, T, D, C)
    index = block_end_index(layout, inputs.shape[1])
    return states.gather(1, index[..., None, None].expand(-1, -1, *states.shape[2:]))


def reference_s4_kernel(self, length):
    """K[l] = 2 Re(sum_n C dB_n dA_n^l), every power exponentiated on its own, plain complex autograd."""
    log_da, c_db = self.discretize()
    powers = torch.exp(log_da.unsqueeze(-1) * torch.arange(length, dtype=torch.float64))  # (H, N/2, L)
    return 2 * torch.einsum("hn,hnl->hl", c_db.to(powers.dtype), powers).real.to(c_db.real.dtype)


def values_and_gradients(function, inputs, module):
    torch.manual_seed(1)
    outputs = function()
    weights = torch.randn(outputs.shape, dtype=outputs.dtype)  # not randn_like: it follows the output's strides
    gradients = torch.autograd.grad((outputs * weights).sum(), [inputs, *module.parameters()])
    return outputs, gradients


@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
@pytest.mark.parametrize("length", [1, 5, 8, 37, 40])
def test_block_end_outputs_equal_the_full_convolution_read_at_block_ends(kernel, length):
    """Whole blocks, a partial last block, a chunk shorter than a block; the second row is padded at its end."""
    config = tiny_config(bst_variant="mf", ssm_kernel=kernel)
    ssm = BSTStateSpace(config)
    ssm.kernel_generator.reset_parameters()
    torch.nn.init.normal_(ssm.skip)  # the initialisation starts it at zero, which would hide the skip term
    ssm.double()
    inputs = torch.randn(2, length, config.hidden_size, dtype=torch.float64, requires_grad=True)
    token_mask = torch.ones(2, length, dtype=torch.bool)
    token_mask[1, length // 2 + 1 :] = False
    layout = BlockLayout.build(
        token_mask, torch.zeros(2, dtype=torch.long), config.block_size, has_cache=False, has_padding=True
    )

    fast, fast_gradients = values_and_gradients(lambda: ssm(inputs, layout, None, block_ends=True), inputs, ssm)
    reference, reference_gradients = values_and_gradients(
        lambda: reference_block_ends(ssm, inputs, layout, None), inputs, ssm
    )
    assert fast.shape == (2, -(-length // config.block_size), config.hidden_size, config.num_context_states)
    torch.testing.assert_close(fast, reference, atol=1e-12, rtol=1e-12)
    for fast_gradient, reference_gradient in zip(fast_gradients, reference_gradients):
        torch.testing.assert_close(fast_gradient, reference_gradient, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_every_variant_equals_its_straightforward_reference(variant, kernel, monkeypatch):
    """The model with its fast paths against the same model with the full-length "mf" path and the naive "s4" kernel:
    logits and every parameter's gradient, float64, left-padded rows."""
    model = open_context_path(BSTForCausalLM(tiny_config(bst_variant=variant, ssm_kernel=kernel))).double().train()
    input_ids = torch.randint(2, 97, (2, 27))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0

    def logits_and_gradients():
        model.zero_grad()
        output = model(input_ids, attention_mask=attention_mask, labels=input_ids)
        output.loss.backward()
        return output.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fast_logits, fast_gradients = logits_and_gradients()
    monkeypatch.setattr(BSTStateSpace, "_block_end_outputs", reference_block_ends)
    monkeypatch.setattr(BSTS4DKernel, "forward", reference_s4_kernel)
    reference_logits, reference_gradients = logits_and_gradients()
    assert fast_logits.dtype == torch.float64
    torch.testing.assert_close(fast_logits, reference_logits, atol=1e-10, rtol=1e-10)
    for name, gradient in reference_gradients.items():
        torch.testing.assert_close(fast_gradients[name], gradient, atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.parametrize("length", [1, 7, 64, 1000])
def test_real_vandermonde_sum_is_the_real_part_of_the_naive_complex_sum(length):
    log_z = torch.complex(-torch.rand(5, 4, dtype=torch.float64) * 0.1, torch.randn(5, 4, dtype=torch.float64))
    coefficients = torch.randn(3, 5, 4, dtype=torch.complex128)
    powers = torch.exp(log_z[..., None] * torch.arange(length, dtype=torch.float64))  # (H, N, L)
    expected = torch.einsum("bhn,hnl->bhl", coefficients, powers).real
    torch.testing.assert_close(real_vandermonde_sum(coefficients, log_z, length), expected, atol=1e-12, rtol=1e-12)


def test_complex_powers_backward_equals_autograd_through_the_exponential():
    log_z = torch.complex(-torch.rand(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) * 3)
    log_z.requires_grad_()
    scale = torch.arange(11, dtype=torch.float64)
    weights = torch.randn(5, 3, 11, dtype=torch.complex128)
    powers = ComplexPowers.apply(log_z.unsqueeze(-1), scale, torch.float64)
    expected_powers = scaled_complex_exp(log_z.unsqueeze(-1), scale, torch.float64)
    (gradient,) = torch.autograd.grad((powers * weights).real.sum(), log_z)
    (expected_gradient,) = torch.autograd.grad((expected_powers * weights).real.sum(), log_z)
    torch.testing.assert_close(powers, expected_powers, atol=0, rtol=0)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-12, rtol=1e-12)


def random_log_z(*shape):
    return torch.complex(-torch.rand(*shape, dtype=torch.float64) * 0.1, torch.randn(*shape, dtype=torch.float64) * 3)


@pytest.mark.parametrize("count", [1, 2, 7, 37, 64, 128])
def test_power_table_equals_direct_powers_with_their_autograd_gradient(count):
    """Exact and padded factorisations of the exponent range; the gradient against autograd through exp."""
    log_z = random_log_z(5, 3, 2).requires_grad_()
    exponents = torch.arange(count, dtype=torch.float64).view(-1, 1, 1)
    weights = torch.randn(5, count, 3, 2, dtype=torch.complex128)
    powers = PowerTable.apply(log_z, count, torch.float64)
    expected_powers = torch.exp(log_z.unsqueeze(1) * exponents)
    (gradient,) = torch.autograd.grad((powers * weights).real.sum(), log_z)
    (expected_gradient,) = torch.autograd.grad((expected_powers * weights).real.sum(), log_z)
    torch.testing.assert_close(powers, expected_powers, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-10, rtol=1e-12)


def test_power_table_in_float32_is_as_accurate_as_the_reduced_phase_exponential():
    """Up to the block size of the "mf" scan, with fast phases (|theta| up to ~10 rad per step)."""
    log_z = random_log_z(64, 32)
    exponents = torch.arange(512, dtype=torch.float64).view(-1, 1)
    exact = torch.exp(log_z.unsqueeze(1) * exponents)
    table_error = (PowerTable.apply(log_z, 512, torch.float32).to(exact.dtype) - exact).abs().max()
    exponential_error = (scaled_complex_exp(log_z.unsqueeze(1), exponents, torch.float32).to(exact.dtype) - exact)
    assert table_error <= exponential_error.abs().max()


@pytest.mark.parametrize("rows, terms", [(5, 4), (2, 4)])
def test_weighted_sum_equals_product_then_sum_with_its_gradients(rows, terms):
    """Both backward loops: over the terms (fewer than the rows) and over the rows."""
    x = torch.randn(3, rows, terms, 6, dtype=torch.complex128, requires_grad=True)
    w = torch.randn(3, terms, 6, dtype=torch.complex128, requires_grad=True)
    weights = torch.randn(3, rows, 6, dtype=torch.complex128)
    total = WeightedSum.apply(x, w)
    expected = (x * w.unsqueeze(1)).sum(2)
    gradients = torch.autograd.grad((total * weights).real.sum(), [x, w])
    expected_gradients = torch.autograd.grad((expected * weights).real.sum(), [x, w])
    torch.testing.assert_close(total, expected, atol=1e-13, rtol=1e-13)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_block_state_scan_equals_the_recurrence_with_its_gradients(steps):
    x = torch.randn(3, 2, steps, 5, dtype=torch.complex128, requires_grad=True)
    a = torch.randn(3, steps, 5, dtype=torch.complex128, requires_grad=True)
    weights = torch.randn(3, 2, steps, 5, dtype=torch.complex128)
    state, expected = torch.zeros_like(x[:, :, 0]), []
    for k in range(steps):
        state = a[:, None, k] * state + x[:, :, k]
        expected.append(state)
    expected = torch.stack(expected, dim=2)
    states = BlockStateScan.apply(x, a)
    gradients = torch.autograd.grad((states * weights).real.sum(), [x, a])
    expected_gradients = torch.autograd.grad((expected * weights).real.sum(), [x, a])
    torch.testing.assert_close(states, expected, atol=1e-13, rtol=1e-13)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-13, rtol=1e-13)
@pytest.mark.parametrize("length", [1, 7, 64, 1000])
def test_real_vandermonde_sum_gradients_equal_autograd_through_naive_powers(length):
    """The factored power tables (outer products of two smaller ones, one per side of the matmul) and the real views:
    gradients of coefficients with a batch dimension (the carried-state use) and of log z, against every power
    exponentiated on its own."""
    log_z = torch.complex(-torch.rand(5, 4, dtype=torch.float64) * 0.1, torch.randn(5, 4, dtype=torch.float64))
    log_z.requires_grad_()
    coefficients = torch.randn(3, 5, 4, dtype=torch.complex128, requires_grad=True)
    weights = torch.randn(3, 5, length, dtype=torch.float64)
    powers = torch.exp(log_z.unsqueeze(-1) * torch.arange(length, dtype=torch.float64))  # (H, N, L)
    naive = torch.einsum("khn,hnl->khl", coefficients, powers).real
    fast = real_vandermonde_sum(coefficients, log_z, length)
    torch.testing.assert_close(fast, naive, atol=1e-12, rtol=1e-12)
    gradients = torch.autograd.grad((fast * weights).sum(), (coefficients, log_z))
    expected = torch.autograd.grad((naive * weights).sum(), (coefficients, log_z))
    for gradient, reference in zip(gradients, expected):
        torch.testing.assert_close(gradient, reference, atol=1e-10, rtol=1e-10)


def direct_causal_convolution(inputs, kernel, skip):
    """y[b, d, c, t] = sum_{s <= t} k[d, c, t - s] u[b, d, s] + skip[d, c] u[b, d, t], summed term by term."""
    length = inputs.shape[-1]
    terms = [torch.einsum("bds,dcs->bdc", inputs[..., : t + 1], kernel[..., : t + 1].flip(-1)) for t in range(length)]
    return torch.stack(terms, -1) + skip[..., None] * inputs[:, :, None]


@pytest.mark.parametrize("batch", [1, 2])  # the kernel gradient's sum over the batch has its own branch for 1
def test_fft_convolution_with_skip_equals_the_direct_formula(batch):
    """The skip term as the kernel's tap 0 inside the FFT convolution: values and the gradients of inputs, kernel and
    skip, plus torch's numerical gradcheck."""
    inputs = torch.randn(batch, 3, 21, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, 4, 21, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    direct = direct_causal_convolution(inputs, kernel, skip)
    grad_output = torch.randn(direct.shape, dtype=torch.float64)
    expected = torch.autograd.grad(direct, (inputs, kernel, skip), grad_output)
    fft = CausalFFTConvolution.apply(inputs, kernel, skip)
    torch.testing.assert_close(fft, direct, atol=1e-12, rtol=1e-12)
    for actual, reference in zip(torch.autograd.grad(fft, (inputs, kernel, skip), grad_output), expected):
        torch.testing.assert_close(actual, reference, atol=1e-12, rtol=1e-12)
    small = [tensor[..., :9].detach().requires_grad_() for tensor in (inputs, kernel)]
    assert torch.autograd.gradcheck(CausalFFTConvolution.apply, (*small, skip.detach().requires_grad_()))


@pytest.mark.parametrize("variant, kernel", [(v, k) for v, k in VARIANTS_AND_KERNELS if v != "mf"])
def test_state_space_without_cache_equals_convolution_plus_skip(variant, kernel):
    """The SSM sublayer without a cache (skip folded into the convolution, the output a view with filters outermost)
    against the convolution and the skip product taken apart; the second row is padded at its end."""
    config = tiny_config(bst_variant=variant, ssm_kernel=kernel)
    ssm = BSTStateSpace(config)
    ssm.kernel_generator.reset_parameters()
    torch.nn.init.normal_(ssm.skip)
    ssm.double()
    inputs = torch.randn(2, 19, config.hidden_size, dtype=torch.float64, requires_grad=True)
    token_mask = torch.ones(2, 19, dtype=torch.bool)
    token_mask[1, 12:] = False
    layout = BlockLayout.build(
        token_mask, torch.zeros(2, dtype=torch.long), config.block_size, has_cache=False, has_padding=True
    )

    def reference():
        masked = (inputs * token_mask[..., None]).transpose(1, 2)  # (B, D, T)
        convolved = causal_fft_conv(masked, ssm.kernel(19)) + ssm.skip[..., None] * masked[:, :, None]
        return convolved.permute(0, 3, 1, 2)  # (B, T, D, C)

    fast, fast_gradients = values_and_gradients(lambda: ssm(inputs, layout, None), inputs, ssm)
    expected, expected_gradients = values_and_gradients(reference, inputs, ssm)
    torch.testing.assert_close(fast, expected, atol=1e-12, rtol=1e-12)
    for fast_gradient, expected_gradient in zip(fast_gradients, expected_gradients):
        torch.testing.assert_close(fast_gradient, expected_gradient, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("filters", [1, 4])
def test_rms_normed_projection_equals_norm_then_projection(filters):
    """r * ((W diag g) y) against the norm written out, then filter c through its own weight: values and the
    gradients of the states (a strided view, as the SSM output is), the norm weight and the projection weight."""
    states = torch.randn(2, filters, 6, 7, dtype=torch.float64).transpose(2, 3).requires_grad_()  # (B, C, T, D)
    norm_weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(filters, 5, 6, dtype=torch.float64, requires_grad=True)
    eps = 1e-3
    normed = norm_weight * states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + eps)
    direct = torch.einsum("bctd,ced->bcte", normed, weight)
    fast = rms_normed_projection(states, norm_weight, eps, weight)
    torch.testing.assert_close(fast, direct, atol=1e-12, rtol=1e-12)
    grad_output = torch.randn(direct.shape, dtype=torch.float64)
    expected = torch.autograd.grad(direct, (states, norm_weight, weight), grad_output)
    for actual, reference in zip(torch.autograd.grad(fast, (states, norm_weight, weight), grad_output), expected):
        torch.testing.assert_close(actual, reference, atol=1e-12, rtol=1e-12)
    zero_rows = torch.zeros(1, filters, 3, 6, dtype=torch.float64, requires_grad=True)  # padding: y = 0, r = eps^-1/2
    (gradient,) = torch.autograd.grad(rms_normed_projection(zero_rows, norm_weight, eps, weight).sum(), zero_rows)
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("variant", ["sh", "mh"])
def test_context_keys_values_fold_equals_the_norm_and_projection_modules(variant):
    """The attention's folded path (float32, plain modules) against the same modules run one after the other, which a
    hook on the norm forces: context keys and values, and the gradients of the states and of the three modules."""
    model = open_context_path(BSTForCausalLM(tiny_config(bst_variant=variant))).train()
    attention = model.model.layers[0].attention
    filters = model.config.num_context_states
    states = torch.randn(2, 11, filters, model.config.hidden_size).permute(0, 1, 3, 2).requires_grad_()  # (B,T,D,C)
    parameters = [p for name, p in attention.named_parameters() if name.startswith(("context_norm", "context_k"))]
    parameters += [attention.context_v_proj.weight]

    def keys_values_and_gradients():
        keys, values = attention._context_keys_values(states)
        loss = (keys * torch.linspace(-1, 1, keys.shape[-1])).sum() + (values**2).sum()
        return keys.detach(), values.detach(), torch.autograd.grad(loss, [states, *parameters])

    folded = keys_values_and_gradients()
    handle = attention.context_norm.register_forward_hook(lambda module, args, output: None)
    modules = keys_values_and_gradients()
    handle.remove()
    assert type(attention.context_norm) is BSTRMSNorm
    torch.testing.assert_close(folded[0], modules[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded[1], modules[1], atol=1e-5, rtol=1e-5)
    for folded_gradient, module_gradient in zip(folded[2], modules[2]):
        torch.testing.assert_close(folded_gradient, module_gradient, atol=1e-5, rtol=1e-4)
