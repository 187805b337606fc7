"""The distillation divergence equals its definition, TRL's, and the straightforward computation.

* beta=0 / beta=1 are forward / reverse KL, 0<beta<1 is TRL's generalized JSD;
* the lean divergence == the reference formula and an independent float64 computation,
  values and gradients, for every beta, chunked, on selected rows, in bf16.
"""

from __future__ import annotations

import pytest
import torch

from onpolicy_lib import divergence
from onpolicy_lib.divergence import generalized_jsd, generalized_jsd_reference

BETAS = [0.0, 0.3, 0.5, 1.0]


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in float64 from the definition."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


def float64_divergence(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD from the definition, in float64 (independent of both implementations)."""
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    if beta == 0:
        return (pt * (pt.log() - ps.log())).sum(-1)
    if beta == 1:
        return (ps * (ps.log() - pt.log())).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)


def value_and_grad(fn, s: torch.Tensor, t: torch.Tensor, weights: torch.Tensor):
    s = s.detach().clone().requires_grad_(True)
    values = fn(s, t)
    (values * weights).sum().backward()  # non-uniform upstream gradient, not just a mean
    return values.detach(), s.grad


# ---------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3, 0.5])
def test_generalized_jsd_matches_definition(beta):
    torch.manual_seed(0)
    s, t = torch.randn(7, 11) * 3, torch.randn(7, 11) * 3
    got = generalized_jsd(s, t, beta).double()
    if beta == 0:
        expected = kl(t, s)  # forward KL(teacher || student)
    elif beta == 1:
        expected = kl(s, t)  # reverse KL(student || teacher)
    else:
        ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
        m = beta * pt + (1 - beta) * ps
        expected = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_agrees_with_trl(beta):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    labels = torch.zeros(2, 5, dtype=torch.long)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
    ours = generalized_jsd(s.reshape(-1, 13), t.reshape(-1, 13), beta).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the lean divergence
@pytest.fixture(params=["fused", "recomputed"])
def grad_path(request, monkeypatch):
    """Both ways the gradient is made: in the forward pass and kept (CPU), or recomputed in backward."""
    monkeypatch.setattr(divergence, "FUSED_GRAD_DEVICES", ("cpu",) if request.param == "fused" else ())
    return request.param


@pytest.mark.parametrize("beta", BETAS)
def test_lean_divergence_equals_reference_and_float64(beta, monkeypatch, grad_path):
    monkeypatch.setattr(divergence, "CHUNK_ELEMENTS", 3 * 37)  # 3 rows per slice: many slices
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 37) * 3, torch.randn(2, 9, 37) * 3
    mask = torch.rand(2, 9) < 0.6
    mask[0, :4] = True  # a run longer than a slice
    rows = mask.flatten().nonzero().squeeze(1)
    weights = torch.rand(rows.numel())

    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, beta, rows=rows), s, t, weights)
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a[mask], b[mask], beta), s, t, weights)
    exact = value_and_grad(lambda a, b: float64_divergence(a[mask], b[mask], beta), s.double(), t.double(),
                           weights.double())
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-5, atol=1e-6)
    # Two float32 computations in different orders differ by a few ulps of the largest gradient, and
    # which element shows it depends on the CPU's vector width: bound the difference by that scale.
    grad_scale = ref[1].abs().max().item()
    torch.testing.assert_close(lean[1], ref[1], rtol=1e-5, atol=1e-5 * grad_scale)
    # Against float64: as close as float32 arithmetic allows.
    torch.testing.assert_close(lean[0].double(), exact[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1].double(), exact[1], rtol=1e-4, atol=1e-6)
    assert (lean[1].flatten(0, 1)[~mask.flatten()] == 0).all()  # unscored rows get no gradient


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_lean_divergence_any_row_order_duplicates_and_bf16(beta, grad_path):
    torch.manual_seed(1)
    s, t = torch.randn(6, 23) * 2, torch.randn(6, 23) * 2
    rows = torch.tensor([4, 1, 2, 2, 5])  # unsorted, one row twice
    weights = torch.rand(5)
    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, beta, rows=rows), s, t, weights)
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a[rows], b[rows], beta), s, t, weights)
    torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-7)

    # bf16 logits (the GPU path): computed in fp32 like the reference, gradient in the logits' dtype.
    sb, tb = s.bfloat16(), t.bfloat16()
    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, beta), sb, tb, torch.ones(6))
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a, b, beta), sb, tb, torch.ones(6))
    assert lean[0].dtype == torch.float32 and lean[1].dtype == torch.bfloat16
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1].float(), ref[1].float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
def test_the_gradient_made_in_the_forward_pass_is_the_recomputed_one_bit_for_bit(beta, dtype, monkeypatch):
    """Keeping the forward's gradient changes no bit of a training step (rows listed once, as they are),
    in fp32 and in bf16 logits alike."""
    monkeypatch.setattr(divergence, "CHUNK_ELEMENTS", 3 * 37)
    torch.manual_seed(2)
    s, t = (torch.randn(2, 9, 37) * 3).to(dtype), (torch.randn(2, 9, 37) * 3).to(dtype)
    rows = (torch.rand(2, 9) < 0.6).flatten().nonzero().squeeze(1)
    weights = torch.rand(rows.numel())
    results = []
    for devices in (("cpu",), ()):
        monkeypatch.setattr(divergence, "FUSED_GRAD_DEVICES", devices)
        results.append(value_and_grad(lambda a, b: generalized_jsd(a, b, beta, rows=rows), s, t, weights))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_gradient_made_in_the_forward_pass_is_used_once(monkeypatch):
    monkeypatch.setattr(divergence, "FUSED_GRAD_DEVICES", ("cpu",))
    s = torch.randn(3, 11, requires_grad=True)
    loss = generalized_jsd(s, torch.randn(3, 11), 0.5).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used once"):
        loss.backward()


def test_lean_divergence_without_grad_and_refuses_a_trainable_teacher():
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    with torch.no_grad():
        torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd_reference(s, t, 0.5))
    with torch.inference_mode():  # a teacher forward under inference mode, as the reference allows
        t_inference = t.clone()
    weights = torch.rand(3)
    lean = value_and_grad(lambda a, b: generalized_jsd(a, b, 0.5), s, t_inference, weights)
    ref = value_and_grad(lambda a, b: generalized_jsd_reference(a, b, 0.5), s, t_inference, weights)
    torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="teacher"):
        generalized_jsd(s, t.requires_grad_(), 0.5)


def test_token_nll_is_cross_entropy_slice_by_slice(monkeypatch):
    from onpolicy_lib import divergence

    monkeypatch.setattr(divergence, "CHUNK_ELEMENTS", 3 * 50)  # three rows per slice: several slices
    logits, targets = torch.randn(2, 7, 50) * 3, torch.randint(0, 50, (2, 7))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(divergence.token_nll(logits, targets), expected.reshape(2, 7), rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.37, 1.0])
def test_cakld_equals_its_definition_values_and_gradients(gamma, monkeypatch, grad_path):
    """BitDistiller's CAKLD: gamma * reverse KL + (1 - gamma) * forward KL, chunked, against float64."""
    monkeypatch.setattr(divergence, "CHUNK_ELEMENTS", 3 * 37)
    torch.manual_seed(1)
    s, t = torch.randn(2, 9, 37) * 3, torch.randn(2, 9, 37) * 3
    mask = torch.rand(2, 9) < 0.6
    rows = mask.flatten().nonzero().squeeze(1)
    weights = torch.rand(rows.numel())

    lean = value_and_grad(lambda a, b: divergence.cakld(a, b, gamma, rows=rows), s, t, weights)
    ref = value_and_grad(lambda a, b: divergence.cakld_reference(a[mask], b[mask], gamma), s, t, weights)
    exact = value_and_grad(lambda a, b: gamma * kl(a[mask], b[mask]) + (1 - gamma) * kl(b[mask], a[mask]),
                           s.double(), t.double(), weights.double())
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1], ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lean[0].double(), exact[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean[1].double(), exact[1], rtol=1e-4, atol=1e-6)
    # The endpoints are GKD's forward (gamma 0) and reverse (gamma 1) KL.
    if gamma in (0.0, 1.0):
        torch.testing.assert_close(lean[0], generalized_jsd(s, t, gamma, rows=rows))
    with pytest.raises(ValueError, match="gamma must be in"):
        divergence.cakld(s, t, 1.5)
