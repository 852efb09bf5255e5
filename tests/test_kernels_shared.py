"""Checks of the Triton kernels shared by the CPU interpreter tests and the CUDA tests, so both
exercise the same code paths. No tests here: test_kernels_interp.py and test_kernels_gpu.py call
these on their device. Every kernel output buffer starts NaN-poisoned, so an element a kernel
forgets to write fails the comparison."""
import math

import torch

from steer_megatron.loss import fused_linear_token_stats, token_stats
from steer_megatron.loss.vocab_parallel import local_stats as _local_stats, merge_stats as _merge
from tests.reference_math import dense_stats

FIELDS = ("logprob", "entropy", "sum_p2", "sum_p2_logp")


def make_logits(n, v_pad, vocab, dtype, device, seed, scale=4.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, v_pad, generator=g, dtype=torch.float64) * scale)
    logits[:, vocab:] = 50.0  # garbage in the padding: must never count
    target = torch.randint(0, vocab, (n,), generator=g)
    return logits.to(dtype).to(device), target.to(device)


def _close(got, want, rel, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite (an unwritten element?)"
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel * scale:.3g}"


def check_forward(device, n, vocab, v_pad, dtype, seed, block=None, p2=True, rel=2e-5, rows=None):
    """Kernel partial stats -> merge vs the float64 dense reference and the PyTorch path."""
    from steer_megatron.loss.kernels import triton_stats

    logits, target = make_logits(n, v_pad, vocab, dtype, device, seed)
    out = torch.full((n, 6), float("nan"), dtype=torch.float32, device=device)
    local = triton_stats.local_stats(logits, target, vocab, 0, p2, block=block, out=out, rows=rows)
    assert local.data_ptr() == out.data_ptr()
    log_z, ent, p2s, p2l, zt = _merge(local[None])
    got = dict(zip(FIELDS, (zt - log_z, ent, p2s, p2l)))
    ref = dict(zip(FIELDS, dense_stats(logits.double(), target, vocab)))
    torch_path = token_stats(logits, target, vocab_size=vocab, kernel="torch", p2_stats=p2)
    via_api = token_stats(logits, target, vocab_size=vocab, kernel="triton", p2_stats=p2)
    for f in FIELDS:
        if not p2 and f.startswith("sum_p2"):
            assert torch.all(got[f] == 0) and torch.all(getattr(via_api, f) == 0)
            continue
        _close(got[f], ref[f], rel, f"{f} vs float64")
        _close(got[f], getattr(torch_path, f).double(), rel, f"{f} vs torch path")
        torch.testing.assert_close(getattr(via_api, f), got[f])


def check_backward(device, n, vocab, v_pad, dtype, seed, use_lp=True, use_h=True, block=None):
    """Kernel logit gradient (NaN-poisoned buffer) vs the PyTorch path and float64 autograd."""
    from steer_megatron.loss.kernels import triton_stats

    logits, target = make_logits(n, v_pad, vocab, dtype, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    w_lp = torch.randn(n, generator=g).to(device) if use_lp else None
    w_h = torch.randn(n, generator=g).to(device) if use_h else None
    log_z, entropy = _merge(_local_stats(logits, target, vocab, 0, 64, torch.float32, False)[None])[:2]
    poisoned = torch.full_like(logits, float("nan"))
    grad = triton_stats.grad_logits(logits, target, log_z, entropy, w_lp, w_h, vocab, 0, poisoned, block=block)
    assert torch.isfinite(grad).all(), "unwritten gradient elements"
    assert torch.all(grad[:, vocab:] == 0), "padded columns must get zero gradient"
    x = logits.clone().requires_grad_()
    s2 = token_stats(x, target, vocab_size=vocab, kernel="torch")
    _backward(s2, w_lp, w_h)
    xr = logits.double().clone().requires_grad_()
    lp, h, _, _ = dense_stats(xr, target, vocab)
    (((w_lp.double() * lp).sum() if use_lp else 0) + ((w_h.double() * h).sum() if use_h else 0)).backward()
    ulp = 2.0 ** -7 if dtype in (torch.bfloat16, torch.float16) else 1e-5  # output rounding
    gmax = xr.grad.abs().max().item()
    for what, want in (("torch path", x.grad.double()), ("float64", xr.grad)):
        err = (grad.double() - want).abs().max().item()
        assert err <= ulp * max(gmax, 1e-3), f"grad vs {what}: {err:.3g} (max |g| {gmax:.3g})"


def _backward(st, w_lp, w_h):
    loss = 0
    if w_lp is not None:
        loss = loss + (w_lp * st.logprob).sum()
    if w_h is not None:
        loss = loss + (w_h * st.entropy).sum()
    loss.backward()


def check_autograd_paths(device, n, vocab, v_pad, dtype, seed, inplace):
    """token_stats(kernel='triton') end to end (forward + backward, in place or not) vs 'torch'."""
    logits, target = make_logits(n, v_pad, vocab, dtype, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 2)
    w_lp, w_h = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    grads = {}
    for kernel in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        work = leaf * 1  # a non-leaf buffer the in-place backward may overwrite
        st = token_stats(work, target, vocab_size=vocab, kernel=kernel, inplace_backward=inplace)
        _backward(st, w_lp, w_h)
        grads[kernel] = leaf.grad
        if inplace:
            assert torch.equal(work.detach(), leaf.grad), "in-place gradient must land in the logits' storage"
    assert grads["triton"].dtype == logits.dtype
    ulp = 2.0 ** -7 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    err = (grads["triton"].double() - grads["torch"].double()).abs().max().item()
    assert err <= ulp * max(grads["torch"].abs().max().item(), 1e-3), err


def check_fused_lm_head(device, n, hid, vocab, v_pad, dtype, seed, block_v, kernel="triton"):
    """fused_linear_token_stats vs token_stats on materialised logits: statistics and both grads."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hid, generator=g).to(dtype).to(device)
    w = (torch.randn(v_pad, hid, generator=g) / math.sqrt(hid) * 3).to(dtype).to(device)
    target = torch.randint(0, vocab, (n,), generator=g).to(device)
    w_lp, w_h = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    a = fused_linear_token_stats(h1, w1, target, vocab_size=vocab, block_v=block_v, kernel=kernel)
    _backward(a, w_lp, w_h)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = token_stats(h2 @ w2.t(), target, vocab_size=vocab, kernel="torch")
    _backward(b, w_lp, w_h)
    for f in FIELDS:
        _close(getattr(a, f), getattr(b, f).double(), 5e-5, f"fused {f}")
    assert torch.all(w1.grad[vocab:] == 0)
    low = dtype in (torch.bfloat16, torch.float16)
    for got, want, what in ((h1.grad, h2.grad, "grad hidden"), (w1.grad, w2.grad, "grad weight")):
        err = (got.double() - want.double()).abs().max().item()
        # bf16: the reference rounds the full logit gradient to bf16 before its matmuls, the fused
        # path rounds per block; a few bf16 ulps of the largest entry apart
        tol = (2.0 ** -5 if low else 1e-4) * max(want.abs().max().item(), 1e-3)
        assert torch.isfinite(got).all() and err <= tol, f"{what}: {err:.3g} > {tol:.3g}"


def steer_like_token_loss(n, seed, device):
    """A per-token loss shaped like the policy losses: clipped-ratio surrogate with advantages and
    old log-probs, a weight made from the detached sum p^2 (as STEER's are), and an entropy bonus.
    Returns (token_loss(stats, rows) for the fused path, the same loss on whole TokenStats)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    old = (-torch.rand(n, generator=g, dtype=torch.float64) * 6).to(device)
    mask = (torch.rand(n, generator=g) > 0.2).to(device)
    denom = mask.sum().clamp(min=1)

    def per_token(st, rows):
        lp, ent = st.logprob.double(), st.entropy.double()
        ratio = torch.exp(lp - old[rows])
        surr = torch.minimum(ratio * adv[rows], ratio.clamp(0.8, 1.2) * adv[rows])
        weight = (1.0 - st.sum_p2.double()).detach()
        terms = -(weight * surr) - 1e-2 * ent
        return (terms * mask[rows]).sum() / denom

    return per_token, (lambda st: per_token(st, slice(0, n)))


def check_fused_token_loss(device, n, hid, vocab, v_pad, dtype, seed, chunk, kernel="triton", rel=1e-4):
    """fused_linear_token_loss (gradients made in forward, chunk by chunk) vs token_stats on the
    materialised logits and the same loss: loss, statistics and both gradients, NaN-free."""
    from steer_megatron.loss import fused_linear_token_loss

    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hid, generator=g).to(dtype).to(device)
    w = (torch.randn(v_pad, hid, generator=g) / math.sqrt(hid) * 3).to(dtype).to(device)
    target = torch.randint(0, vocab, (n,), generator=g).to(device)
    fused_fn, whole_fn = steer_like_token_loss(n, seed + 1, device)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, st = fused_linear_token_loss(h1, w1, target, fused_fn, vocab_size=vocab, chunk_tokens=chunk, kernel=kernel)
    (2.0 * loss).backward()  # a non-unit upstream gradient must scale both stored gradients
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = token_stats(h2 @ w2.t(), target, vocab_size=vocab, kernel="torch")
    ref_loss = whole_fn(ref)
    (2.0 * ref_loss).backward()
    _close(loss.detach(), ref_loss.detach().double(), rel, "fused token loss")
    for f in FIELDS:
        _close(getattr(st, f), getattr(ref, f).double().detach(), 5e-5, f"fused-loss {f}")
    assert torch.all(w1.grad[vocab:] == 0), "padded weight rows must get zero gradient"
    low = dtype in (torch.bfloat16, torch.float16)
    for got, want, what in ((h1.grad, h2.grad, "grad hidden"), (w1.grad, w2.grad, "grad weight")):
        err = (got.double() - want.double()).abs().max().item()
        # bf16: grad_W is accumulated chunk by chunk in bf16 (see fused_linear_token_loss)
        tol = (2.0 ** -4 if low else rel) * max(want.abs().max().item(), 1e-3)
        assert torch.isfinite(got).all() and err <= tol, f"{what}: {err:.3g} > {tol:.3g}"
