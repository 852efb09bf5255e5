"""The Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1), on small shapes with
padded vocab columns, bf16 and fp32: against the float64 reference and the PyTorch path, with
NaN-poisoned outputs. Skipped without triton (pip install 'steer-megatron[kernels]'), and on CUDA
machines, where test_kernels_gpu.py runs the same checks compiled.

Triton decides interpreter-or-compiler when `triton` is first imported (its own helpers such as
tl.max are jit functions too), and other test modules import triton early through transformers.
So unless TRITON_INTERPRET=1 was set when this process started, the one test collected here runs
this module again in a child pytest with the variable set, selecting what the parent selects
(the bf16 twins of the fp32 checks carry the marker `extended`).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: test_kernels_gpu.py runs these checks compiled", allow_module_level=True)
try:
    import triton  # noqa: F401
except ImportError as exc:  # absent, or a broken install
    pytest.skip(f"triton not importable ({exc}); optional extra 'kernels'", allow_module_level=True)

from tests import test_kernels_shared as K  # noqa: E402

N, VOCAB, V_PAD = 13, 300, 384  # 84 padded columns; 13 rows: no power-of-two luck (and few interpreted programs)
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the child pytest with TRITON_INTERPRET=1")


def _run_interpreter_child(markexpr: str, least: int) -> None:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markexpr, str(Path(__file__).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    passed, skipped = (re.search(rf"(\d+) {w}", tail) for w in ("passed", "skipped"))
    # only the launching test may skip in the child: a child that skipped everything proves nothing
    assert passed and int(passed.group(1)) >= least and skipped and int(skipped.group(1)) == 1, tail


@pytest.mark.skipif(IN_INTERPRETER, reason="already in the interpreter process")
def test_interpreter_suite_in_subprocess():
    _run_interpreter_child("not extended", least=17)


@pytest.mark.extended  # the bf16 twins of the fp32 reference checks: ~2 min of interpreter time
@pytest.mark.skipif(IN_INTERPRETER, reason="already in the interpreter process")
def test_interpreter_extended_cases_in_subprocess():
    _run_interpreter_child("extended", least=8)


def test_kernels_are_interpreted():
    if not IN_INTERPRETER:
        pytest.skip("runs in the child pytest with TRITON_INTERPRET=1")
    from steer_megatron.loss.kernels import interpreted, select_kernel

    assert interpreted()
    assert select_kernel("triton", torch.zeros(1)) == "triton"
    assert select_kernel("auto", torch.zeros(1)) == "torch"  # auto never picks the interpreter


# bf16 runs in make test through the p2-free, several-rows and autograd cases; the bf16 twins of the
# fp32 reference checks cost ~2 min of interpreter time and run in make test-extended
BF16_EXTENDED = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.extended)


@in_interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16_EXTENDED])
@pytest.mark.parametrize("block", [64, None], ids=["multi_block", "one_block"])
def test_forward_matches_reference(dtype, block):
    K.check_forward("cpu", N, VOCAB, V_PAD, dtype, seed=1 + (block or 0), block=block)


@in_interpreter
@pytest.mark.parametrize("rows", [pytest.param(2, marks=pytest.mark.extended), 4])
def test_forward_several_rows_per_program(rows):
    """13 rows in programs of 2 or 4: the last program's spare rows must store nothing."""
    K.check_forward("cpu", N, VOCAB, V_PAD, torch.bfloat16, seed=14 + rows, block=64, rows=rows)


@in_interpreter
def test_full_tiles_without_tail():
    """Vocab a multiple of the tile: every tile takes the unmasked path, none the masked tail."""
    K.check_forward("cpu", N, 256, V_PAD, torch.float32, seed=11, block=64)
    K.check_backward("cpu", N, 256, V_PAD, torch.float32, seed=12, block=64)


@in_interpreter
def test_forward_without_p2_stats():
    K.check_forward("cpu", N, VOCAB, V_PAD, torch.bfloat16, seed=3, block=128, p2=False)


@in_interpreter
@pytest.mark.parametrize("use_lp,use_h", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16_EXTENDED])
def test_backward_matches_reference(dtype, use_lp, use_h):
    K.check_backward("cpu", N, VOCAB, V_PAD, dtype, seed=4, use_lp=use_lp, use_h=use_h, block=64)


@in_interpreter
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_autograd_end_to_end(inplace):
    K.check_autograd_paths("cpu", N, VOCAB, V_PAD, torch.bfloat16, seed=5, inplace=inplace)


@in_interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16_EXTENDED])
def test_fused_lm_head(dtype):
    K.check_fused_lm_head("cpu", N, 24, VOCAB, V_PAD, dtype, seed=6, block_v=128)


@in_interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16_EXTENDED])
def test_fused_token_loss(dtype):
    K.check_fused_token_loss("cpu", N, 24, VOCAB, V_PAD, dtype, seed=13, chunk=16,
                             rel=1e-4 if dtype == torch.float32 else 2e-2)


@in_interpreter
def test_peaked_rows_and_seq_batch_layout():
    logits = torch.zeros(6, 4, 256)
    logits[0, 1, 7] = 80.0  # near one-hot
    logits[2] = torch.linspace(-30, 30, 256)
    target = torch.randint(0, 256, (6, 4))
    a = token_stats_pair(logits, target)
    for f in K.FIELDS:
        torch.testing.assert_close(getattr(a["triton"], f), getattr(a["torch"], f), atol=2e-5, rtol=2e-5)
    assert a["triton"].logprob.shape == (6, 4)


def token_stats_pair(logits, target):
    from steer_megatron.loss import token_stats

    return {k: token_stats(logits, target, kernel=k) for k in ("torch", "triton")}


@in_interpreter
def test_nan_and_inf_logits_raise_as_the_torch_path():
    from steer_megatron.loss import token_stats

    logits, target = K.make_logits(8, 128, 128, torch.float32, "cpu", seed=7)
    for bad in (float("nan"), float("inf")):
        x = logits.clone()
        x[3, 5] = bad
        with pytest.raises(FloatingPointError, match=r"first: \[3\]"):
            token_stats(x, target, kernel="triton")


@in_interpreter
def test_padding_only_shard_and_empty_input():
    from steer_megatron.loss.kernels import triton_stats

    logits, target = K.make_logits(5, 64, 64, torch.float32, "cpu", seed=8)
    out = triton_stats.local_stats(logits, target, 0, 64, True)
    assert torch.all(out[:, 0] == torch.finfo(torch.float32).min) and torch.all(out[:, 1:] == 0)
    empty = triton_stats.local_stats(logits[:0], target[:0], 64, 0, True)
    assert empty.shape == (0, 6)


def _tp_worker(vocab, tp):
    os.environ["TRITON_INTERPRET"] = "1"  # a fresh process: set before the kernels are imported
    import torch.distributed as dist

    from steer_megatron.loss import token_stats

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logits, target = K.make_logits(N, V_PAD, vocab, torch.float32, "cpu", seed=9)
    v_local = V_PAD // tp
    x = logits[:, rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    st = token_stats(x, target, vocab_size=vocab, tp_group=dist.group.WORLD, kernel="triton")
    (st.logprob.sum() + 0.1 * st.entropy.sum()).backward()
    return torch.stack([getattr(st, f) for f in K.FIELDS]).detach(), x.grad


@in_interpreter
def test_tensor_parallel_gloo_matches_single_rank():
    """TP=2 over gloo with the interpreted kernels and the shared all-gather merge; vocab 180 of
    384 columns leaves rank 1 with padding only."""
    from steer_megatron.loss import token_stats
    from steer_megatron.parallel import spawn_ranks

    vocab = 180
    results = spawn_ranks(_tp_worker, 2, vocab, 2)
    logits, target = K.make_logits(N, V_PAD, vocab, torch.float32, "cpu", seed=9)
    x = logits.clone().requires_grad_()
    st = token_stats(x, target, vocab_size=vocab, kernel="torch")
    (st.logprob.sum() + 0.1 * st.entropy.sum()).backward()
    want = torch.stack([getattr(st, f) for f in K.FIELDS]).detach()
    for stats, _ in results:
        torch.testing.assert_close(stats, want, atol=2e-5, rtol=2e-5)
    grad = torch.cat([g for _, g in results], dim=1)
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-4)
    assert torch.all(grad[:, vocab:] == 0)
