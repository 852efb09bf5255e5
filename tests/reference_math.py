"""Independent float64 references for the loss tests: dense softmax over the full vocabulary."""
import torch


def dense_stats(logits: torch.Tensor, target: torch.Tensor, vocab_size: int):
    """log p(target), H, sum p^2, sum p^2 log p from a dense float64 log_softmax."""
    lp = torch.log_softmax(logits[..., :vocab_size].double(), -1)
    p = lp.exp()
    return (
        lp.gather(-1, target[..., None]).squeeze(-1),
        -(p * lp).sum(-1),
        (p * p).sum(-1),
        (p * p * lp).sum(-1),
    )


def ppo_dual_clip_reference(adv, ratio, clip_low, clip_high, dual_c):
    """Per-token dual-clip PPO loss written element by element (slow, obvious)."""
    out = torch.empty_like(ratio, dtype=torch.float64)
    for i, (a, r) in enumerate(zip(adv.double().flatten().tolist(), ratio.double().flatten().tolist())):
        loss = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
        if dual_c is not None and a < 0:
            loss = min(loss, -a * dual_c)
        out.view(-1)[i] = loss
    return out
