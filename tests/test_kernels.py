"""Kernel selection and the fused LM-head path on CPU (PyTorch kernels; triton not needed)."""
import pytest
import torch

import steer_megatron.loss.kernels as kernels
from steer_megatron.config import ConfigError, load_config, validate_config
from steer_megatron.loss import fused_linear_token_stats, token_stats
from tests import test_kernels_shared as K


def test_auto_on_cpu_never_touches_triton(monkeypatch):
    def boom():
        raise AssertionError("auto must not import triton for CPU tensors")

    monkeypatch.setattr(kernels, "triton_import_error", boom)
    logits, target = K.make_logits(6, 64, 60, torch.bfloat16, "cpu", seed=0)
    assert kernels.select_kernel("auto", logits) == "torch"
    st = token_stats(logits, target, vocab_size=60)  # kernel="auto" by default
    ref = token_stats(logits, target, vocab_size=60, kernel="torch")
    torch.testing.assert_close(st.entropy, ref.entropy, atol=0, rtol=0)


def test_explicit_triton_without_triton_fails_clearly(monkeypatch):
    monkeypatch.setattr(kernels, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    x = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match=r"steer-megatron\[kernels\]"):
        kernels.select_kernel("triton", x)
    assert kernels.select_kernel("auto", x) == "torch"
    with pytest.raises(ValueError, match="must be one of"):
        kernels.select_kernel("cuda", x)


def test_explicit_triton_on_cpu_outside_the_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setattr(kernels, "triton_import_error", lambda: None)
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.select_kernel("triton", torch.zeros(2, 8))
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        kernels.select_kernel("triton", torch.zeros(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_v", [64, 1000], ids=["blocks", "one_block"])
def test_fused_lm_head_torch_kernel(dtype, block_v):
    K.check_fused_lm_head("cpu", 37, 24, 300, 384, dtype, seed=block_v, block_v=block_v, kernel="torch")


def test_fused_lm_head_float64_gradcheck_and_shapes():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 20, (2, 3), generator=g)

    def f(h, w):
        st = fused_linear_token_stats(h, w, target, vocab_size=20, block_v=7)
        return st.logprob, st.entropy

    assert f(h, w)[0].shape == (2, 3)
    assert torch.autograd.gradcheck(f, (h, w))


def test_fused_lm_head_bad_inputs():
    h, w, t = torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_token_stats(h, torch.zeros(16, 7), t)
    with pytest.raises(TypeError, match="must match"):
        fused_linear_token_stats(h, w.double(), t)
    with pytest.raises(ValueError, match="target shape"):
        fused_linear_token_stats(h, w, t[:3])
    with pytest.raises(ValueError, match="target ids"):
        fused_linear_token_stats(h, w, torch.full((4,), 16))


def test_config_keys():
    cfg = load_config()
    assert cfg.algorithm.loss_kernel == "auto" and cfg.algorithm.fused_lm_head is False
    validate_config(load_config(None, ["algorithm.loss_kernel=torch"]), check_paths=False)
    with pytest.raises(ConfigError, match="algorithm.loss_kernel"):
        validate_config(load_config(None, ["algorithm.loss_kernel=cuda"]), check_paths=False)
    validate_config(load_config(None, ["algorithm.fused_lm_head=true"]), check_paths=False)
    validate_config(load_config(None, ["algorithm.fused_lm_head=true", "parallel.tp=2",  # gathered (test_memory_knobs)
                                       "parallel.sequence_parallel=true"]), check_paths=False)


@pytest.mark.parametrize("chunk", [5, 16, 1000], ids=["chunks", "uneven", "one_chunk"])
def test_fused_token_loss_float64_exact(chunk):
    """Gradients made in forward, chunk by chunk, equal the unfused float64 loss to rounding."""
    K.check_fused_token_loss("cpu", 37, 24, 300, 384, torch.float64, seed=chunk, chunk=chunk, kernel="torch", rel=1e-10)


def test_fused_token_loss_bf16_torch_kernel():
    K.check_fused_token_loss("cpu", 37, 24, 300, 384, torch.bfloat16, seed=3, chunk=8, kernel="torch", rel=2e-2)


def test_fused_token_loss_rejects_non_scalar_and_bad_shapes():
    from steer_megatron.loss import fused_linear_token_loss

    h, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="scalar"):
        fused_linear_token_loss(h.requires_grad_(), w, t, lambda st, rows: st.logprob)
    with pytest.raises(ValueError, match="target shape"):
        fused_linear_token_loss(h, w, t[:3], lambda st, rows: st.logprob.sum())
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_token_loss(h, w, t, lambda st, rows: st.logprob.sum(), chunk_tokens=0)
