"""The fast SSM paths against straightforward references, in float64, values and gradients: "mf" block ends without
full-length outputs, the real-matmul "s4" kernel with its one-pass power backward, every variant and kernel end to
end."""

import pytest
import torch
from conftest import VARIANTS_AND_KERNELS, open_context_path, tiny_config

from modeling_bst import BSTForCausalLM
from modeling_bst.modeling_bst import (
    BlockLayout,
    BSTS4DKernel,
    BSTStateSpace,
    BlockStateScan,
    ComplexPowers,
    PowerTable,
    WeightedSum,
    block_end_index,
    real_vandermonde_sum,
    scaled_complex_exp,
    vandermonde_sum,
)


def reference_block_ends(self, inputs, layout, layer_cache, kernel_cache=None):
    """The straightforward "mf" path: the full-sequence FFT convolution, then the outputs at the block ends."""
    states = self(inputs, layout, layer_cache, kernel_cache)  # (B, T, D, C)
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
def test_real_vandermonde_sum_is_the_real_part_of_the_complex_one(length):
    log_z = torch.complex(-torch.rand(5, 4, dtype=torch.float64) * 0.1, torch.randn(5, 4, dtype=torch.float64))
    coefficients = torch.randn(3, 5, 4, dtype=torch.complex128)
    expected = vandermonde_sum(coefficients, log_z, length).real
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
