"""Training checkpoints with megatron-core dist_checkpointing: save at one TP/PP/DP layout,
load at another.

Layout of a checkpoint root:
    root/latest                    name of the newest complete checkpoint (written last)
    root/iter_0000100/dist/        dist_checkpointing: model (+ optimizer) sharded tensors
    root/iter_0000100/rng/*.pt     per-rank RNG states (restored only at the same layout)
    root/iter_0000100/meta.json    step, extra state (data position, ...), resolved config,
                                   HF architecture, padded vocab, save layout
A checkpoint is written into root/iter_XXXXXXX.tmp-* and renamed when every rank is done, so
a crashed save never looks complete; find_latest only returns directories with meta.json.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


@dataclass
class CheckpointMeta:
    """What meta.json holds; returned by load_checkpoint and read_meta."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"data": {"consumed_samples": ...}}
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config
    hf_config: dict[str, Any] = field(default_factory=dict)  # config.json of the model
    padded_vocab_size: int = 0
    layout: dict[str, int] = field(default_factory=dict)  # tp, pp, dp at save time
    has_optimizer: bool = False
    format_version: int = FORMAT_VERSION

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "CheckpointMeta":
        known = {k: d[k] for k in CheckpointMeta.__dataclass_fields__ if k in d}
        return CheckpointMeta(**known)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
    )


def _rng_file(ckpt: str) -> str:
    from megatron.core import parallel_state as ps

    return os.path.join(
        ckpt, "rng",
        f"pp{ps.get_pipeline_model_parallel_rank()}_tp{ps.get_tensor_model_parallel_rank()}"
        f"_dp{ps.get_data_parallel_rank()}.pt",
    )


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _chunks(model) -> list[torch.nn.Module]:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline (several model chunks per rank) is not supported")
    return chunks


def _sharded_state_dict(model, optimizer, is_loading: bool) -> dict[str, Any]:
    # The bare GPTModel, not the DDP wrapper: its keys carry no "module." prefix, so the
    # checkpoint does not depend on how the model was wrapped.
    model_sd = _gpt(_chunks(model)[0]).sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        # The distributed optimizer's default format is no longer accepted by dist_checkpointing;
        # "fully_reshardable" (gathered over DP at save time) reloads at any TP / PP / DP, as a
        # resume at another layout needs. Other optimizers ignore the key.
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return sd


def _placeholder_optimizer_state(optimizer) -> None:
    """A fresh torch Adam holds no per-parameter state until its first step, and megatron-core
    0.16's distributed optimizer reads each parameter's 'step' from that state when it builds the
    template to load into (DistributedOptimizer.state_dict asserts one step value). Megatron's own
    training loop fills the state with placeholders before loading; so do we: zero moments and
    step 0, all overwritten by the checkpoint's values (load_state_dict sets the saved step)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.init_state_fn is None:
            continue
        sub.init_state_fn(sub.optimizer, sub.config)
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                sub.optimizer.state[p].setdefault("step", torch.tensor(0.0))


@contextmanager
def _step_kept_through_param_load(optimizer):
    """megatron-core 0.16's fully_reshardable loader copies every key of a parameter's optimizer
    state from the checkpoint's, which leaves out 'step' (restored from the param groups just
    before), so a torch Adam's per-parameter 'step' raises KeyError. For the load only, this
    optimizer object's setter is given each parameter's own (already restored) step to copy onto
    itself, and each parameter gets its own step tensor after; megatron's code is unchanged."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer):
            continue

        def setter(model_param, tensors, _sub=sub, _set=sub._set_main_param_and_optimizer_states):
            gi, go = _sub.model_param_group_index_map[model_param]
            own = _sub.optimizer.state[_sub.optimizer.param_groups[gi]["params"][go]]
            if "step" in own and "step" not in tensors:
                tensors = {**tensors, "step": own["step"]}
            _set(model_param, tensors)

        sub._set_main_param_and_optimizer_states = setter
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states
    for sub in patched:
        # the loader gives every parameter the same step tensor, and torch Adam increments each
        # parameter's step in place: one tensor would count every parameter's update
        for st in sub.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def _gpt(model) -> torch.nn.Module:
    from steer_megatron.models.hf_import import unwrap

    return unwrap(model)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model,
    optimizer=None,
    *,
    extra: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> str:
    """Collective: save model (+ optimizer, RNG, step, extra, config) under root/iter_<step>.

    extra and config must be JSON-serialisable. keep_last: delete older complete checkpoints
    beyond the newest N (None keeps all). Returns the checkpoint directory.
    """
    from megatron.core import dist_checkpointing

    root = os.path.abspath(os.fspath(root))
    final = os.path.join(root, iter_dir_name(step))
    tmp = final + ".tmp"
    for name, obj in (("extra", extra), ("config", config)):
        try:
            json.dumps(obj or {})
        except TypeError as e:
            raise TypeError(f"save_checkpoint({name}=...) must be JSON-serialisable: {e}") from None
    if _rank() == 0:
        begin_checkpoint_dir(tmp)
    _barrier()
    dist_checkpointing.save(_sharded_state_dict(model, optimizer, is_loading=False), os.path.join(tmp, "dist"))
    torch.save(_rng_state(), _rng_file(tmp))
    _barrier()
    if _rank() == 0:
        gpt = _gpt(model)
        meta = CheckpointMeta(
            step=step, extra=extra or {}, config=config or {},
            hf_config=dict(getattr(getattr(gpt, "hf_arch", None), "raw", {}) or {}),
            padded_vocab_size=int(getattr(getattr(gpt, "vocab_info", None), "padded_size", 0) or 0),
            layout=_layout(), has_optimizer=optimizer is not None,
        )
        commit_checkpoint_dir(root, tmp, final, meta)
        if keep_last:
            prune(root, keep_last)
    _barrier()
    return final


def begin_checkpoint_dir(tmp: str) -> None:
    """Create an empty temp checkpoint dir (removing leftovers of a crashed save)."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "dist"))
    os.makedirs(os.path.join(tmp, "rng"))


def commit_checkpoint_dir(root: str, tmp: str, final: str, meta: CheckpointMeta) -> None:
    """Single process: write meta.json into tmp, rename tmp to final, then point `latest` at it.
    meta.json is the completion mark, so a crash at any point leaves no complete-looking dir."""
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta.__dict__, f, indent=2)
    if os.path.exists(final):  # re-saving a step: move the old one aside first
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _write_latest(root, os.path.basename(final))


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))  # atomic on POSIX


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(os.path.join(path, "dist"))


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints under root as (step, path), oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        path = os.path.join(root, name)
        if m and _complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint under root (the `latest` marker if valid), else None.

    A path that is itself a checkpoint directory is returned as is."""
    root = os.path.abspath(os.fspath(root))
    if _complete(root):
        return root
    marker = os.path.join(root, LATEST)
    if os.path.isfile(marker):
        with open(marker) as f:
            path = os.path.join(root, f.read().strip())
        if _complete(path):
            return path
        log.warning("%s points to an incomplete checkpoint %s; scanning instead", marker, path)
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the newest keep_last complete checkpoints; returns deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """meta.json of a checkpoint (path may be the root: the latest is used)."""
    ckpt = find_latest(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint (a dir with meta.json and dist/) under {os.fspath(path)}")
    with open(os.path.join(ckpt, "meta.json")) as f:
        return CheckpointMeta.from_dict(json.load(f))


def load_checkpoint(
    path: str | os.PathLike,
    model,
    optimizer=None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> CheckpointMeta:
    """Collective: load the checkpoint at path (a checkpoint dir, or a root: latest) into model
    (+ optimizer) at the current layout, which may differ from the one it was saved at.

    RNG states are restored only when the layout is unchanged (they are per rank). Returns the
    meta (step, extra, config). The model must have the checkpoint's padded vocabulary: build it
    with build_gpt_model(..., padded_vocab=meta.padded_vocab_size).
    """
    from megatron.core import dist_checkpointing

    ckpt = find_latest(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint (a dir with meta.json and dist/) under {os.fspath(path)}")
    meta = read_meta(ckpt)
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"{ckpt}: format_version {meta.format_version}, this code reads {FORMAT_VERSION}")
    vocab = getattr(_gpt(model), "vocab_info", None)
    if vocab is not None and meta.padded_vocab_size and vocab.padded_size != meta.padded_vocab_size:
        raise ValueError(
            f"{ckpt} was saved with padded vocab {meta.padded_vocab_size} but the model has {vocab.padded_size}; "
            f"build it with build_gpt_model(..., padded_vocab={meta.padded_vocab_size})"
        )
    use_opt = optimizer is not None and load_optimizer
    if use_opt and not meta.has_optimizer:
        raise ValueError(f"{ckpt} has no optimizer state; pass load_optimizer=False to load the model only")
    if use_opt:
        _placeholder_optimizer_state(optimizer)
    state = dist_checkpointing.load(_sharded_state_dict(model, optimizer if use_opt else None, is_loading=True),
                                    os.path.join(ckpt, "dist"))
    _gpt(_chunks(model)[0]).load_state_dict(state["model"], strict=True)
    if use_opt:
        with _step_kept_through_param_load(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        rng = _rng_file(ckpt)
        if meta.layout == _layout() and os.path.exists(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        elif _rank() == 0 and meta.layout != _layout():
            log.warning("layout changed (%s -> %s): RNG states not restored", meta.layout, _layout())
        elif _rank() == 0:
            log.info("%s has no RNG state for this rank (e.g. a converted checkpoint)", ckpt)
    _barrier()
    return meta
