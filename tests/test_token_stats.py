"""token_stats against a dense float64 reference, on one process (TP = 1)."""
import pytest
import torch

from steer_megatron.loss import check_vocab_shard, padded_vocab_size, token_stats
from tests.reference_math import dense_stats


def _inputs(n, v_pad, vocab, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v_pad, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_statistics_match_dense_reference(dtype, tol, chunk):
    vocab, v_pad = 1000, 1024  # padded columns hold garbage that must be ignored
    logits, target = _inputs(53, v_pad, vocab, dtype, seed=chunk)
    logits[:, vocab:] = 50.0
    st = token_stats(logits, target, vocab_size=vocab, chunk_tokens=chunk)
    # the reference sees exactly the (possibly rounded) values the function saw
    ref = dense_stats(logits.double(), target, vocab)
    for got, want in zip((st.logprob, st.entropy, st.sum_p2, st.sum_p2_logp), ref):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


def test_peaked_and_flat_distributions_are_exact():
    vocab = 500
    logits = torch.zeros(3, vocab, dtype=torch.float64)
    logits[1, 7] = 80.0  # nearly one-hot: entropy ~ 0, sum p^2 ~ 1
    logits[2] = torch.linspace(-30, 30, vocab, dtype=torch.float64)
    target = torch.tensor([3, 7, 499])
    st = token_stats(logits, target)
    ref = dense_stats(logits, target, vocab)
    for got, want in zip((st.logprob, st.entropy, st.sum_p2, st.sum_p2_logp), ref):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert abs(st.entropy[0].item() - torch.log(torch.tensor(500.0, dtype=torch.float64)).item()) < 1e-12


def test_gradcheck_float64():
    logits, target = _inputs(5, 24, 20, torch.float64, seed=3)
    logits.requires_grad_()

    def f(x):
        st = token_stats(x, target, vocab_size=20, chunk_tokens=2)
        return st.logprob, st.entropy

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("use_logp,use_entropy", [(True, False), (False, True), (True, True)])
def test_gradient_matches_autograd_of_dense_reference(use_logp, use_entropy):
    vocab = 300
    logits, target = _inputs(40, 384, vocab, torch.float32, seed=5)
    g = torch.Generator().manual_seed(9)
    w_lp, w_h = torch.randn(40, generator=g), torch.randn(40, generator=g)
    x = logits.clone().requires_grad_()
    st = token_stats(x, target, vocab_size=vocab, chunk_tokens=16)
    loss = (w_lp * st.logprob).sum() * use_logp + (w_h * st.entropy).sum() * use_entropy
    loss.backward()
    xr = logits.double().clone().requires_grad_()
    lp, h, _, _ = dense_stats(xr, target, vocab)
    ((w_lp.double() * lp).sum() * use_logp + (w_h.double() * h).sum() * use_entropy).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    assert torch.all(x.grad[:, vocab:] == 0)


def test_inplace_backward_writes_into_logits_and_bf16_grad():
    vocab = 256
    logits, target = _inputs(16, 256, vocab, torch.bfloat16, seed=11)
    ref_x = logits.clone().requires_grad_()
    token_stats(ref_x, target).logprob.sum().backward()
    leaf = logits.clone().requires_grad_()
    work = leaf * 1  # a non-leaf buffer whose storage may be reused, as Megatron's output
    st = token_stats(work, target, inplace_backward=True)
    st.logprob.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad, ref_x.grad)
    assert torch.equal(work.detach(), ref_x.grad)  # the gradient landed in work's storage


def test_sequence_batch_layout_and_int32_targets():
    logits, target = _inputs(24, 128, 128, torch.float32, seed=2)
    st3 = token_stats(logits.view(6, 4, 128), target.view(6, 4).int())
    st2 = token_stats(logits, target)
    assert st3.logprob.shape == (6, 4)
    torch.testing.assert_close(st3.entropy.flatten(), st2.entropy)


def test_non_differentiable_outputs_and_no_grad_needed():
    logits, target = _inputs(4, 64, 64, torch.float32, seed=1)
    x = logits.clone().requires_grad_()
    st = token_stats(x, target)
    assert not st.sum_p2.requires_grad and not st.sum_p2_logp.requires_grad
    assert st.logprob.requires_grad and st.entropy.requires_grad


def test_bad_inputs_raise_clear_errors():
    logits, target = _inputs(4, 64, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="target ids must lie in"):
        token_stats(logits, torch.tensor([0, 1, 64, 2]))
    with pytest.raises(ValueError, match="target ids must lie in"):
        token_stats(logits, torch.tensor([0, 1, 60, -100]), vocab_size=64)
    with pytest.raises(ValueError, match="target ids must lie in"):
        token_stats(logits, torch.tensor([0, 1, 60, 2]), vocab_size=50)  # 60 is a padded column
    with pytest.raises(ValueError, match="target shape"):
        token_stats(logits, target[:3])
    bad = logits.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in 1 token row\(s\) \(first: \[2\]\)"):
        token_stats(bad, target)
    bad[2, 5] = float("inf")
    with pytest.raises(FloatingPointError):
        token_stats(bad, target)
    with pytest.raises(ValueError, match="vocab_size"):
        token_stats(logits, target, vocab_size=65)
    with pytest.raises(TypeError):
        token_stats(logits, target.float())


def test_padded_vocab_size_and_shard_check():
    assert padded_vocab_size(151_936, 1) == 151_936
    assert padded_vocab_size(151_643, 4) == 152_064
    assert padded_vocab_size(1000, 2) == 1024
    assert check_vocab_shard(1024, 4) == 256
    with pytest.raises(ValueError, match="does not divide the padded vocabulary"):
        check_vocab_shard(1000, 3)


def test_without_p2_stats_logprob_and_entropy_are_unchanged():
    logits, target = _inputs(30, 200, 200, torch.float32, seed=4)
    full = token_stats(logits, target)
    lean = token_stats(logits, target, p2_stats=False, chunk_tokens=7)
    torch.testing.assert_close(lean.logprob, full.logprob)
    torch.testing.assert_close(lean.entropy, full.entropy)
    assert torch.all(lean.sum_p2 == 0) and torch.all(lean.sum_p2_logp == 0)
