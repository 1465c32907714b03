"""Checkpoints that survive being killed: written to a temporary file, flushed, then renamed over the old one.

A crash or kill at any moment of a write leaves the previous ``checkpoint.pt`` intact (``os.replace`` is atomic
on POSIX file systems). Loading uses ``torch.load(..., weights_only=True)``: a checkpoint holds only tensors and
plain Python values (RNG states are stored as tensors and lists).
"""

from __future__ import annotations

import glob
import os
import pickle
import random
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "find_resume_checkpoint",
    "rng_state",
    "set_rng_state",
    "check_compatible",
    "check_resumable",
]

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run."""


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that ``path`` is at every moment either the old file or the complete new
    one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _remove_stale_temporaries(path)
    # make the rename itself durable
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files of earlier writes of ``path`` whose process is gone (a write killed by SIGKILL
    or a power cut leaves one behind, as large as the checkpoint)."""
    directory, base = os.path.split(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}.tmp-*")):
        pid = tmp.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        try:
            os.remove(tmp)
        except OSError:  # removed by someone else meanwhile, or not ours to remove
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no valid pid: leave the file alone
        return True
    return True


# what a run needs besides the weights to continue exactly
RESUME_ENTRIES = ("optimizer", "scheduler", "rng", "config")


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message goes on about loading untrusted pickles with weights_only=False: not the advice here
        detail = ("not a torch.save file of tensors and plain values" if isinstance(e, pickle.UnpicklingError)
                  else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise CheckpointError(f"cannot read checkpoint {path!r} ({detail}); it may be truncated or not a mimfast "
                              "checkpoint") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path!r} is not a mimfast pretraining checkpoint (no 'model' / 'step' entries)")
    return state


def check_resumable(state: dict[str, Any], path: str) -> None:
    """Raise unless a loaded checkpoint holds everything a run needs to continue (not only its weights)."""
    missing = [k for k in RESUME_ENTRIES if k not in state]
    if missing:
        raise CheckpointError(f"{path!r} holds no {', '.join(missing)}: a weights-only file cannot resume a run "
                              "(load its 'model' entry into the model instead)")


def find_resume_checkpoint(output_dir: Optional[str], model: str, runs_root: str = "runs") -> Optional[str]:
    """``--resume auto``: ``<output_dir>/checkpoint.pt`` if it exists; with no output dir, the newest
    ``runs/<model>-*/checkpoint.pt``; None when there is nothing to resume."""
    if output_dir is not None:
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    found = glob.glob(os.path.join(runs_root, f"{glob.escape(model)}-*", CHECKPOINT_NAME))
    return max(found, key=os.path.getmtime) if found else None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _py_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def check_compatible(state: dict[str, Any], model_name: str, method: str, model_keys: dict[str, tuple[int, ...]],
                     path: str) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint was written for this model: same name and method,
    same parameter names and shapes."""
    saved = state.get("config", {})
    if saved.get("model") not in (None, model_name) or saved.get("method") not in (None, method):
        raise CheckpointError(f"checkpoint {path!r} was written for model {saved.get('model')!r} (method "
                              f"{saved.get('method')!r}), but this run builds {model_name!r} (method {method!r}); "
                              "pass the same --model, or a different --output-dir / --resume")
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    missing = sorted(set(model_keys) - set(theirs))
    extra = sorted(set(theirs) - set(model_keys))
    shape = sorted(k for k in set(model_keys) & set(theirs) if model_keys[k] != theirs[k])
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        if shape:
            parts.append("shape mismatch " + ", ".join(f"{k}: {theirs[k]} vs {model_keys[k]}" for k in shape[:5]))
        raise CheckpointError(f"checkpoint {path!r} does not fit model {model_name!r}: " + "; ".join(parts))
