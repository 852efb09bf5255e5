"""Which form of the fused LM head the trainer's update runs (algorithm.fused_lm_head: true).

- gradient in forward (loss.fused_linear_token_loss, 6 N H V matmul work): each token chunk's
  logits, statistics, loss and logit gradient in one pass. It needs the micro-batch's loss to be a
  SUM of per-token terms whose coefficients are all known before the step: the policy loss of each
  token may depend only on that token's statistics and on fixed inputs (advantages, old and
  rollout log-probs, the mini-batch token count, STEER's old-policy |Omega| range).
- recompute (loss.fused_linear_token_stats, 8 N H V): statistics with autograd, any loss; the
  logits are recomputed in backward. Used whenever the form above does not apply, and for the
  forward-only passes (old log-probs, diagnostics), which have no backward.

`token_loss_blocker` says why the first form does not apply (None: it does).
"""
from __future__ import annotations

from typing import Callable

# Policy losses whose per-token term depends only on the token itself, given the loss config:
# a name absent here couples tokens (a sequence ratio, a top-k or a random draw over the
# micro-batch, STEER's |Omega| range taken at the current policy).
_PER_TOKEN: dict[str, Callable[[object], str | None]] = {
    **{name: (lambda loss: None) for name in
       ("grpo", "entropy_reg", "entropy_adv", "cispo", "w_reinforce", "psr", "nsr", "gtpo")},
    "steer": lambda loss: None if loss.steer.group == "mini_batch" else (
        f"steer.group={loss.steer.group!r} takes min/max |Omega| over the current policy's tokens "
        "(steer.group=mini_batch takes it from the old policy)"),
}


def token_loss_blocker(policy_loss: str, loss, token_mean_over: str) -> str | None:
    """Why the gradient-in-forward form cannot compute this update's loss, or None when it can."""
    if policy_loss not in _PER_TOKEN:
        return f"policy loss {policy_loss!r} couples the tokens of a micro-batch"
    if loss.loss_agg_mode != "token-mean" or token_mean_over != "mini_batch":
        return (f"loss_agg_mode={loss.loss_agg_mode!r}, token_mean_over={token_mean_over!r}: only token-mean over "
                "the mini-batch has a normaliser fixed before the step")
    rc = loss.correction
    if rc.mode != "none" and rc.level != "token":
        return f"rollout_correction.level={rc.level!r} weighs each token by its whole sequence"
    return _PER_TOKEN[policy_loss](loss)
