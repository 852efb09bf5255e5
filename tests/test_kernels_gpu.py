"""The compiled Triton kernels on CUDA: the same checks as the interpreter tests (shared in
test_kernels_shared.py) at real vocabulary sizes, plus what only a GPU shows (row offsets past
2^31 elements). Fresh random inputs each run: the seed is printed and can be pinned with
STEER_TEST_SEED. Skipped without CUDA or triton."""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
if torch.cuda.is_available():
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # absent, or a broken install
        pytest.skip(f"triton not importable ({exc}); optional extra 'kernels'", allow_module_level=True)

from tests import test_kernels_shared as K  # noqa: E402

SEED = int(os.environ.get("STEER_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
print(f"test_kernels_gpu seed {SEED} (STEER_TEST_SEED={SEED} repeats it)")
DEV = "cuda"
# (vocab, padded columns): Qwen2.5's real vocab on one rank, and the last of 4 TP shards
# (V_local 38,016 of which 37,595 real: 151,643 - 3 x 38,016)
SHAPES = [(151_643, 152_064), (37_595, 38_016)]


def test_auto_selects_triton_on_cuda():
    from steer_megatron.loss.kernels import select_kernel

    x = torch.zeros(2, 8, device=DEV, dtype=torch.bfloat16)
    assert select_kernel("auto", x) == "triton"
    assert select_kernel("auto", x.double()) == "torch"
    assert select_kernel("auto", x.cpu()) == "torch"


@pytest.mark.parametrize("vocab,v_pad", SHAPES, ids=["V152064", "V38016"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("block", [None, 1024], ids=["default_block", "block1024"])
def test_forward(vocab, v_pad, dtype, block):
    K.check_forward(DEV, 300, vocab, v_pad, dtype, seed=SEED, block=block, rel=1e-4)


@pytest.mark.parametrize("rows", [2, 4])
def test_forward_several_rows_per_program(rows):
    K.check_forward(DEV, 301, 37_595, 38_016, torch.bfloat16, seed=SEED + 6, block=2048, rel=1e-4, rows=rows)


@pytest.mark.parametrize("vocab,v_pad", SHAPES, ids=["V152064", "V38016"])
@pytest.mark.parametrize("use_lp,use_h", [(True, True), (True, False), (False, True)])
def test_backward(vocab, v_pad, use_lp, use_h):
    K.check_backward(DEV, 200, vocab, v_pad, torch.bfloat16, seed=SEED + 1, use_lp=use_lp, use_h=use_h)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_autograd_end_to_end(inplace, dtype):
    K.check_autograd_paths(DEV, 257, 151_643, 152_064, dtype, seed=SEED + 2, inplace=inplace)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_lm_head(dtype):
    K.check_fused_lm_head(DEV, 1000, 512, 30_000, 30_080, dtype, seed=SEED + 3, block_v=4096)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_token_loss(dtype):
    K.check_fused_token_loss(DEV, 1000, 512, 30_000, 30_080, dtype, seed=SEED + 5, chunk=256,
                             rel=1e-4 if dtype == torch.float32 else 2e-2)


def test_fused_lm_head_torch_kernel_on_cuda():
    K.check_fused_lm_head(DEV, 500, 256, 10_000, 10_240, torch.bfloat16, seed=SEED + 4, block_v=3000, kernel="torch")


def test_rows_past_2_pow_31_elements():
    """Row offsets must be 64-bit: 14,200 x 152,064 bf16 logits (4.3 GB) pass 2^31 elements."""
    from steer_megatron.loss import token_stats
    from steer_megatron.loss.kernels import triton_stats

    n, v = 14_200, 152_064
    if torch.cuda.mem_get_info()[0] < 3 * n * v * 2:
        pytest.skip("not enough free GPU memory")
    g = torch.Generator(device=DEV).manual_seed(SEED)
    logits = (torch.randn(n, v, device=DEV, generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), device=DEV, generator=g)
    tail = slice(n - 64, n)
    got = triton_stats.local_stats(logits, target, v, 0, True)[tail]
    ref = triton_stats.local_stats(logits[tail].clone(), target[tail], v, 0, True)
    torch.testing.assert_close(got, ref)
    want = token_stats(logits[tail].clone(), target[tail], kernel="torch")
    st = token_stats(logits, target, kernel="triton")
    torch.testing.assert_close(st.entropy[tail], want.entropy, atol=1e-4, rtol=1e-4)
    grad = torch.full_like(logits, float("nan"))
    triton_stats.grad_logits(logits, target, *_logz_ent(logits, target), torch.ones(n, device=DEV), None, v, 0, grad)
    assert torch.isfinite(grad[tail]).all() and torch.isfinite(grad[:64]).all()


def _logz_ent(logits, target):
    from steer_megatron.loss.kernels import triton_stats
    from steer_megatron.loss.vocab_parallel import merge_stats as _merge

    log_z, ent = _merge(triton_stats.local_stats(logits, target, logits.shape[1], 0, False)[None])[:2]
    return log_z, ent
