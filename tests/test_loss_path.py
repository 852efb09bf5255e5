"""The trainer's loss call (MegatronActor.micro_batch_stats on megatron's [b, s, V_local] logits):
no logits-sized buffer beyond the gradient (here none: the gradient takes the logits' storage), no
host sync, fp16 covered, and values / gradients equal to a float64 reference and to the previous
path (token_stats on output[:, :-1]) at b > 1, TP = 1 and TP = 2 (gloo)."""
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steer_megatron.loss import get_policy_loss, token_stats
from steer_megatron.loss.policy_losses import PolicyLossConfig, PolicyLossInputs
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor

B, S, VOCAB, V_PAD = 3, 12, 250, 256  # padded vocab: 6 columns of Megatron's padding
CHUNK = 4  # tokens per chunk of the PyTorch path: its temporaries stay well below the logits' size
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")  # ops that wait for the device


class _Recorder(TorchDispatchMode):
    """Sizes of the storages each op allocates (outputs sharing no input's storage) and host syncs."""

    def __init__(self):
        super().__init__()
        self.allocs, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in _SYNC_OPS:
            self.syncs.append(name)
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.allocs.append(t.untyped_storage().nbytes())
        return out


def _actor(policy_loss="grpo"):
    """The actor's loss call without a model: micro_batch_stats only reads cfg and the (absent) tap."""
    actor = MegatronActor.__new__(MegatronActor)
    actor.cfg = ActorConfig(vocab_size=VOCAB, chunk_tokens=CHUNK, policy_loss=policy_loss)
    actor._tap, actor.loss_fn = None, get_policy_loss(policy_loss)
    return actor


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V_PAD, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = torch.rand(B, S - 1, generator=g) < 0.8
    adv = torch.randn(B, S - 1, generator=g)
    old = -torch.rand(B, S - 1, generator=g) * 4
    return logits, ids, mask, adv, old


def _loss(st, mask, adv, old):
    inp = PolicyLossInputs(log_prob=st.logprob, old_log_prob=old, advantages=adv, mask=mask, entropy=st.entropy)
    return get_policy_loss("grpo")(inp, PolicyLossConfig(entropy_coeff=0.01))[0]


def _reference(logits64, ids, mask, adv, old):
    """float64: the statistics of positions 0..S-2 over the real vocabulary, and d loss / d logits."""
    z = logits64.clone().requires_grad_()
    lp_all = torch.log_softmax(z[:, :-1, :VOCAB], -1)
    p = lp_all.exp()
    logp = lp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(p * lp_all).sum(-1)
    sum_p2 = (p * p).sum(-1)
    sum_p2_logp = (p * p * lp_all).sum(-1)
    loss = _loss(type("S", (), dict(logprob=logp, entropy=ent))(), mask, adv, old.double())
    (grad,) = torch.autograd.grad(loss, z)
    return [t.detach() for t in (logp, ent, sum_p2, sum_p2_logp, loss)], grad


def _trainer_call(actor, logits, ids, mask, adv, old):
    """The update's loss_func body on one micro-batch: statistics, policy loss, d loss / d logits."""
    logits = logits.detach().clone().requires_grad_()  # its storage becomes the gradient
    mb = ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv, old_log_prob=old)
    rec = _Recorder()
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with rec, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        st = actor.micro_batch_stats(logits, mb, p2_stats=True)
        loss = _loss(st, mask, adv, old)
        (grad,) = torch.autograd.grad(loss, logits)
    return st, loss, grad, rec, saved, logits


def _tol(dtype, zmax):
    # fp32 accumulation over V_PAD terms of values up to |z| + log V (the statistics' size)
    return 4 * math.sqrt(V_PAD) * torch.finfo(torch.float32).eps * (zmax + math.log(VOCAB))


def tp1_worker():
    init_parallel(ParallelLayout(), seed=0)
    actor = _actor()
    out = {}
    logits64, ids, mask, adv, old = _data()
    for dtype in (torch.float32, torch.float16):
        logits = logits64.to(dtype)
        ref, ref_grad = _reference(logits.double(), ids, mask, adv, old)
        nbytes = logits.untyped_storage().nbytes()
        st, loss, grad, rec, saved, leaf = _trainer_call(actor, logits, ids, mask, adv, old)
        # the previous path, same inputs: token_stats on output[:, :-1], out of place
        prev_leaf = logits.detach().requires_grad_()
        prev_rec = _Recorder()
        with prev_rec:
            prev = token_stats(prev_leaf[:, :-1], ids[:, 1:], vocab_size=VOCAB, chunk_tokens=CHUNK)
            (prev_grad,) = torch.autograd.grad(_loss(prev, mask, adv, old), prev_leaf)
        out[str(dtype)] = dict(
            stats=[st.logprob, st.entropy, st.sum_p2, st.sum_p2_logp, loss.detach()],
            prev=[prev.logprob, prev.entropy, prev.sum_p2, prev.sum_p2_logp], ref=ref,
            grad=grad, prev_grad=prev_grad, ref_grad=ref_grad, nbytes=nbytes,
            big_allocs=[n for n in rec.allocs if n >= nbytes // 2],
            prev_big_allocs=[n for n in prev_rec.allocs if n >= nbytes // 2],
            max_alloc=max(rec.allocs), syncs=rec.syncs,
            grad_in_logits=grad.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr(),
            big_saved_elsewhere=[s for s in saved if s[1] >= nbytes // 2 and s[0] != leaf.untyped_storage().data_ptr()],
            zmax=float(logits.abs().max()))
    return out


def test_trainer_loss_call_allocates_nothing_logits_sized_and_matches_float64():
    (out,) = spawn_ranks(tp1_worker, 1)
    for dtype, r in out.items():
        tol = _tol(dtype, r["zmax"])
        # the gradient is written into the logits' own storage; nothing else logits-sized is made or saved
        assert r["grad_in_logits"], dtype
        assert r["big_allocs"] == [] and r["big_saved_elsewhere"] == [], (dtype, r["big_allocs"])
        assert r["max_alloc"] <= 2 * CHUNK * V_PAD * 4, dtype  # the largest: one fp32 chunk temporary
        assert r["syncs"] == [], (dtype, r["syncs"])
        # the previous path made at least the reshape copy and a gradient (the test can fail)
        assert len(r["prev_big_allocs"]) >= 2, (dtype, r["prev_big_allocs"])
        for got, prev, ref in zip(r["stats"], r["prev"] + [None], r["ref"]):
            torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)
            if prev is not None:
                torch.testing.assert_close(got, prev, atol=tol, rtol=0)
        # the gradient is stored in the logits' dtype: its rounding on top of fp32's
        gtol = torch.finfo(r["grad"].dtype).eps * float(r["ref_grad"].abs().max()) + tol * 1e-2
        torch.testing.assert_close(r["grad"].double(), r["ref_grad"], atol=gtol, rtol=0)
        torch.testing.assert_close(r["grad"], r["prev_grad"], atol=gtol, rtol=0)
        assert float(r["grad"][:, -1].abs().max()) == 0.0  # the last position takes no part


def _tp2_call():
    """The trainer's loss call on this rank's vocab shard (the caller set up TP=2)."""
    from megatron.core import parallel_state as ps

    rank, v_local = ps.get_tensor_model_parallel_rank(), V_PAD // 2
    logits64, ids, mask, adv, old = _data(seed=1)
    ref, ref_grad = _reference(logits64.float().double(), ids, mask, adv, old)
    shard = logits64.float()[..., rank * v_local:(rank + 1) * v_local].contiguous()
    st, loss, grad, rec, _, _ = _trainer_call(_actor(), shard, ids, mask, adv, old)
    return ([st.logprob, st.entropy, st.sum_p2, st.sum_p2_logp, loss.detach()], ref, grad,
            ref_grad[..., rank * v_local:(rank + 1) * v_local], rec.syncs, float(logits64.abs().max()))


def _check_tp2_call(results):
    for stats, ref, grad, ref_grad, syncs, zmax in results:
        tol = _tol(torch.float32, zmax)
        for got, want in zip(stats, ref):
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
        gtol = torch.finfo(torch.float32).eps * float(ref_grad.abs().max()) + tol * 1e-2
        torch.testing.assert_close(grad.double(), ref_grad, atol=gtol, rtol=0)
        assert syncs == []


def fused_form_worker(full):
    """One update with the logits path, then with fused_lm_head, whose update here runs the
    gradient-in-forward form (STEER exact with its group over the mini-batch), in token chunks of 5."""
    from megatron.core import parallel_state as ps

    from steer_megatron.loss.steer import SteerConfig
    from steer_megatron.train.optim import OptimSettings, wrap_for_training
    from tests.test_actor import VOCAB as V, _batch
    from tests.tiny_gpt import build_tiny_gpt, shard

    init_parallel(ParallelLayout(tp=2), seed=3)
    call = _tp2_call()  # one 2-rank spawn for both TP=2 checks
    loss_cfg = PolicyLossConfig(steer=SteerConfig(form="exact", group="mini_batch"), entropy_coeff=0.01)
    out, forms = {}, []
    for fused in (False, True):
        model = build_tiny_gpt(2, V)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(shard(n, full[n], 2, ps.get_tensor_model_parallel_rank()))
        ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1.0, weight_decay=0.0, clip_grad=0.0, adam_eps=1.0))
        actor = MegatronActor(ddp, opt, ActorConfig(vocab_size=V, micro_batch_size=2, mini_batch_size=8, chunk_tokens=5,
                                                    loss=loss_cfg, fused_lm_head=fused), sched)
        forms.append(actor._token_loss_form)
        batch = _batch()
        actor.old_pass(batch)
        metrics = actor.update(batch)
        out[fused] = (batch.old_log_prob, batch.old_entropy, metrics,
                      {n: p.detach().clone() for n, p in model.named_parameters()})
    return out, forms, call


def test_tp2_loss_call_matches_float64_and_fused_gradient_in_forward_update_equals_logits_path():
    from tests.test_actor import _check_fused_matches, full_weights_worker

    full = spawn_ranks(full_weights_worker, 1, False)[0]
    results = spawn_ranks(fused_form_worker, 2, full)
    _check_tp2_call([call for _, _, call in results])
    assert all(forms == [False, True] for _, forms, _ in results)
    _check_fused_matches([out for out, _, _ in results])
    for out, _, _ in results:  # the metrics come from the whole micro-batch, as on the logits path
        for k in ("weight_mean", "omega_absmax", "entropy_loss", "clipfrac_high"):
            assert abs(out[True][2][k] - out[False][2][k]) <= 1e-5 * max(1.0, abs(out[False][2][k])), k


def test_auto_fallback_on_cuda_warns_once(monkeypatch, caplog):
    """'auto' on CUDA logits without loadable Triton: PyTorch runs, one warning, auto_fallback() set
    (the trainer's actor/loss_kernel_fallback metric). select_kernel reads only is_cuda and dtype."""
    from types import SimpleNamespace

    from steer_megatron.loss import kernels

    monkeypatch.setattr(kernels, "_checked", True)
    monkeypatch.setattr(kernels, "_import_error", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(kernels, "_fallback", None)
    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="steer_megatron.loss.kernels"):
        assert kernels.select_kernel("auto", torch.zeros(1)) == "torch" and kernels.auto_fallback() is None
        assert [kernels.select_kernel("auto", cuda_bf16) for _ in range(3)] == ["torch"] * 3
    assert len(caplog.records) == 1 and "No module named 'triton'" in caplog.records[0].getMessage()
    assert "triton" in kernels.auto_fallback()
