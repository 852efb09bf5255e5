"""The trainer's optional entropy diagnostics: one `after_update` call per step, on every rank.

- Probe (diagnostics.probe_every = K): every K steps, EntropyProbe's measured-and-undone update
  on the held batch (the first rollout batch of the run, saved in the run directory), each DP
  rank on its slice; the per-token data is gathered to rank 0 and analysed there as one batch.
- Step change (diagnostics.step_change, implied by the closed loop): the step's own mean
  entropy change H_after - H_before over its batch (one extra forward pass).
- Closed loop (diagnostics.closed_loop): WMinController sets STEER's w_min (and, past w_min's
  bounds, an LR multiplier) for the next step. With closed_loop.trims, a step whose change lies
  outside the band is first scaled back and re-measured (step_trim.py); the loop then sees the
  change of the weights it keeps.

`state_dict()` (JSON) goes into the checkpoint's `extra`: the controller and a reference to the
held batch, so a resumed run probes the same batch and continues the same w_min / LR-scale sequence.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from steer_megatron.config import RunConfig
from steer_megatron.algorithms.controller import WMinController, step_entropy_change
from steer_megatron.diagnostics.entropy_change import EntropyChangeData
from steer_megatron.diagnostics.measure import EntropyProbe
from steer_megatron.algorithms.step_trim import StepTrim, search_step_scale
from steer_megatron.train.actor import ActorBatch, MegatronActor
from steer_megatron.train.control import ControlPlane

PROBE_FILE = "diagnostics/probe_batch.pt"  # relative to the run directory


def _digest(batch: ActorBatch) -> str:
    h = hashlib.sha256()
    for t in (batch.input_ids, batch.loss_mask, batch.advantages):
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _concat(pieces: list[EntropyChangeData]) -> EntropyChangeData:
    """The DP ranks' per-token data as one batch."""
    cat = lambda name: torch.cat([getattr(p, name) for p in pieces])  # noqa: E731
    ratio = None if pieces[0].ratio_after is None else cat("ratio_after")
    first = None if pieces[0].first_order is None else cat("first_order")
    meta = {**pieces[0].meta, "sequences": sum(p.meta.get("sequences", 0) for p in pieces), "dp_slices": len(pieces)}
    omega = {f: torch.cat([p.omega[f] for p in pieces]) for f in pieces[0].omega}
    return EntropyChangeData(measured=cat("measured"), omega=omega, advantages=cat("advantages"), prob=cat("prob"),
                             entropy=cat("entropy"), ratio_after=ratio, first_order=first, meta=meta)


def _to_cpu(d: EntropyChangeData) -> EntropyChangeData:
    return dataclasses.replace(d, **{f: getattr(d, f).cpu() for f in ("measured", "advantages", "prob", "entropy")},
                               omega={k: v.cpu() for k, v in d.omega.items()},
                               ratio_after=None if d.ratio_after is None else d.ratio_after.cpu(),
                               first_order=None if d.first_order is None else d.first_order.cpu())


class DiagnosticsHook:
    @staticmethod
    def build(cfg: RunConfig, control: ControlPlane, run_dir: Path, actor: MegatronActor, dp: int,
              saved: dict | None) -> "DiagnosticsHook | None":
        """The hook when any diagnostic is on (None otherwise); `saved` is a checkpoint's state_dict()."""
        d = cfg.diagnostics
        if not (d.probe_every or d.step_change or d.closed_loop.enabled):
            return None
        return DiagnosticsHook(cfg, control, run_dir, actor, dp, saved or {})

    def __init__(self, cfg: RunConfig, control: ControlPlane, run_dir: Path, actor: MegatronActor, dp: int, saved: dict):
        d = cfg.diagnostics
        self.control, self.run_dir, self.dp = control, Path(run_dir), dp
        self.probe_every, self.band = d.probe_every, tuple(d.closed_loop.band)  # in_band is logged open loop too
        self.probe_seqs = d.probe_prompts * cfg.rollout.n  # 0 = the whole first batch
        self.step_change = d.step_change or d.closed_loop.enabled
        self.ctrl, self.trim = None, None
        self.trims = d.closed_loop.trims if d.closed_loop.enabled else 0
        self.min_step_scale = d.closed_loop.min_step_scale
        if d.closed_loop.enabled:
            c = d.closed_loop
            self.ctrl = WMinController.from_config(c, w_min_init=cfg.algorithm.steer.w_min)
            if saved.get("controller"):
                self.ctrl.load_state_dict(saved["controller"])
            actor.cfg = self.ctrl.actuate(actor.cfg)  # a resumed run continues its w_min and LR scale
        self.held_ref: dict | None = saved.get("probe_batch")
        self.probe: EntropyProbe | None = None
        if self.probe_every and self.held_ref:
            self._hold(self._load_held(), self.held_ref["source_step"])

    # -- the held batch ---------------------------------------------------------------------------
    def _load_held(self) -> ActorBatch:
        path = self.run_dir / self.held_ref["path"]
        held = None
        if self.control.is_driver:
            if not path.is_file():
                raise FileNotFoundError(f"the checkpoint's held probe batch {path} is missing: restore it, or resume "
                                        f"with diagnostics.probe_every=0 into a new trainer.run_name")
            held = ActorBatch(**torch.load(path))
            if _digest(held) != self.held_ref["sha256"]:
                raise RuntimeError(f"{path} does not match the checkpoint's probe batch (sha256 differs)")
        return self.control.broadcast(held)

    def _hold(self, held: ActorBatch, source_step: int) -> None:
        from megatron.core import parallel_state as ps

        if self.control.is_driver and self.held_ref is None:
            path = self.run_dir / PROBE_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"input_ids": held.input_ids, "loss_mask": held.loss_mask, "advantages": held.advantages}, path)
        self.held_ref = {"path": PROBE_FILE, "source_step": source_step, "sha256": _digest(held)}
        self.probe = EntropyProbe(self.probe_every, held.dp_slice(ps.get_data_parallel_rank(), self.dp))

    # -- a step -----------------------------------------------------------------------------------
    def before_update(self, actor: MegatronActor) -> None:
        """Keep the weights the step starts from, when steps may be trimmed."""
        if self.trims:
            self.trim = StepTrim(actor)

    def after_update(self, step: int, actor: MegatronActor, batch: ActorBatch, local: ActorBatch) -> dict[str, float]:
        """Collective. `batch` is the step's whole rollout batch, `local` this rank's slice after the
        update (with old_entropy). Returns the `diag/*` metrics of step + 1 (complete on rank 0)."""
        metrics: dict[str, float] = {}
        if self.probe_every and self.probe is None:  # the run's first batch becomes the held one
            n = self.probe_seqs or len(batch)
            self._hold(ActorBatch(input_ids=batch.input_ids[:n], loss_mask=batch.loss_mask[:n],
                                  advantages=batch.advantages[:n]), step)
        if self.probe is not None:
            metrics.update(self.probe.maybe_run(step + 1, actor, pool=self._pool) or {})
        if self.step_change:
            metrics.update(self._step_change(actor, local))
        return metrics

    def _pool(self, data: EntropyChangeData | None) -> EntropyChangeData | None:
        """Every DP slice's per-token data on rank 0 (None elsewhere); TP ranks hold copies: one sends."""
        from megatron.core import parallel_state as ps

        mine = _to_cpu(data) if data is not None and ps.get_tensor_model_parallel_rank() == 0 else None
        pieces = self.control.gather(mine)
        return None if pieces is None else _concat([p for p in pieces if p is not None])

    def _step_change(self, actor: MegatronActor, local: ActorBatch) -> dict[str, float]:
        lo, hi = self.band
        dh = raw = self._measure(actor, local)
        out = {}
        if self.trim is not None:
            s, dh, passes = search_step_scale(lambda: self._measure(actor, local), self.trim.scale, raw, lo, hi,
                                              self.trims, self.min_step_scale)
            out = {"diag/step_dH_raw": raw, "diag/step_scale": s, "diag/trims": float(passes)}
            self.trim = None  # the step is committed; free the copy
        out.update({"diag/step_dH": dh, "diag/in_band": float(lo <= dh <= hi)})
        if self.ctrl is not None:
            out["diag/w_min"] = self.ctrl.w_min  # the w_min and LR scale this step trained with
            out["diag/lr_scale"] = self.ctrl.lr_scale
            self.ctrl.update(dh)
            actor.cfg = self.ctrl.actuate(actor.cfg)
        return out

    def _measure(self, actor: MegatronActor, local: ActorBatch) -> float:
        dh = step_entropy_change(actor, local)  # DP mean on the last pipeline stage, None elsewhere
        # every rank (every pipeline stage too) sees the same number
        return next(v for v in self.control.all_gather(dh) if v is not None)

    def state_dict(self) -> dict:
        return {"controller": self.ctrl.state_dict() if self.ctrl else None, "probe_batch": self.held_ref}
