"""A training run's folder: checkpoints that survive a kill at any instant, without pickle.

The idea
--------
A run folder (``runs/toy``) is what ``minimoe train`` leaves behind and what ``--resume``,
``minimoe generate`` and ``minimoe chat`` read:

    model.safetensors        the weights and buffers (the expert biases too)
    config.json              the ModelConfig (a minimoe folder; a published one has model_type)
    byte_tokenizer.json      which tokenizer turns text into the model's ids (minimoe.checkpoints.tokenizer)
    train_state.safetensors  AdamW's moments and step counts, the random generators' states
    train_state.json         "step", "history" (one record per step), the run's arguments,
                             the optimiser's hyper-parameters, the learning-rate plan
    routing_by_domain.png    anything else the run wrote (kept across saves)

No file holds a pickle: safetensors stores bare tensors and JSON stores numbers and strings, so
opening a checkpoint someone sent you runs no code (``torch.load`` of a pickle can).

Atomic at every instant
-----------------------
A process can die between any two instructions (SIGKILL, power, out of memory). A save is
therefore a sequence in which every intermediate state still holds one complete checkpoint:

1. write the new checkpoint into ``runs/toy.tmp/``, every file flushed to disk (fsync);
   ``train_state.json`` is written last, so its presence marks the folder complete;
2. rename ``runs/toy`` -> ``runs/toy.old``   (the previous checkpoint, complete, moved aside);
3. rename ``runs/toy.tmp`` -> ``runs/toy``   (the new one takes its name);
4. delete ``runs/toy.old``.

A rename within one file system is atomic (POSIX rename(2)): a folder is either under its
old name or its new one. A kill before 2 leaves ``runs/toy`` intact; between 2 and 3 there is
no ``runs/toy`` but a complete ``.tmp`` (and a complete ``.old``); after 3 a stale ``.old``.
``recover(folder)`` -- called before every load and save -- puts the newest complete one back
under the run's name and removes the rest, so a resume always finds the last complete
checkpoint and a save never deletes it. (The same write-new-then-rename idea is how
databases and editors save files; see rename(2) and fsync(2).)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from minimoe.checkpoints.shards import read_json

STATE_JSON = "train_state.json"  # written last: the mark of a complete checkpoint
STATE_TENSORS = "train_state.safetensors"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# files a save writes itself; anything else in the folder is carried over from the previous save
CHECKPOINT_FILES = (WEIGHTS, CONFIG, STATE_TENSORS, STATE_JSON)

# Tests set this (seconds) to widen the windows inside a save, so a kill lands in them.
SLOW_SAVE_ENV = "MINIMOE_TEST_SLOW_SAVE"


def _pause_for_tests() -> None:
    seconds = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, value) -> None:
    """JSON to ``path`` via ``path.tmp`` + fsync + rename: readers see the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_complete(folder: str) -> bool:
    """True when ``folder`` holds a whole checkpoint (its train_state.json reads)."""
    try:
        with open(os.path.join(folder, STATE_JSON)) as handle:
            return isinstance(json.load(handle).get("step"), int)
    except (OSError, ValueError, AttributeError):
        return False


def holds_run(folder: str) -> bool:
    """True when ``folder`` (or its .tmp/.old twin left by a kill) holds a checkpoint."""
    return any(os.path.exists(os.path.join(f, name)) for f in _twins(folder)
               for name in (WEIGHTS, STATE_JSON))


def is_foreign(folder: str) -> bool:
    """True for an existing, non-empty folder that is no run folder (e.g. ``--out ~/notes``):
    a save would move it aside and delete it, so nothing saves there."""
    if not os.path.isdir(folder) or not os.listdir(folder):
        return False
    return not any(os.path.exists(os.path.join(folder, name)) for name in CHECKPOINT_FILES)


def _twins(folder: str) -> tuple[str, str, str]:
    folder = folder.rstrip("/\\")
    return folder, folder + ".tmp", folder + ".old"


def recover(folder: str) -> Optional[str]:
    """After a kill at any point of ``save``: put the newest complete checkpoint under
    ``folder``'s name and delete leftovers. Returns the folder, or None when none exists."""
    folder, tmp, old = _twins(folder)
    if not os.path.isdir(folder):
        for candidate in (tmp, old):  # .tmp is newer than .old when both are complete
            if os.path.isdir(candidate) and is_complete(candidate):
                os.replace(candidate, folder)
                _fsync_dir(os.path.dirname(os.path.abspath(folder)))
                break
    for leftover in (tmp, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    return folder if os.path.isdir(folder) else None


def recover_if_interrupted(path: str) -> None:
    """``recover`` when ``path`` looks like a run folder a kill left inside a save (no folder,
    but its .tmp or .old twin): so that loading it does not mistake it for a hub id."""
    if not os.path.isdir(path) and any(os.path.isdir(t) for t in _twins(path)[1:]):
        recover(path)


def read_state(folder: str) -> dict:
    """train_state.json of a run folder (after ``recover``); malformed: an error naming it."""
    return read_json(os.path.join(folder, STATE_JSON))


# ----------------------------------------------------------------------------------------------
# Optimiser and RNG state as tensors + JSON
# ----------------------------------------------------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer, names: dict) -> tuple[dict, list]:
    """({"optimizer.<param name>.<key>": tensor}, param_groups as JSON-able dicts).

    ``names`` maps id(parameter) -> its name in the model, so the file says which moment
    belongs to which weight (torch's own state_dict numbers them instead)."""
    tensors = {}
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{names[id(parameter)]}.{key}"] = value.detach().cpu().contiguous()
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [names[id(p)] for p in group["params"]]})
    return tensors, groups


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, groups: list,
                           names: dict, path: str) -> None:
    """Inverse of optimizer_to_tensors; an error names the file and the parameter that differ."""
    own = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = [group["params"] for group in groups]
    if own != saved:
        missing = sorted(set(sum(own, [])) - set(sum(saved, [])))[:3]
        raise ValueError(f"{path}: the saved optimiser state does not match the model's "
                         f"parameters (e.g. not saved: {missing})")
    index = {name: i for i, name in enumerate(sum(own, []))}
    state = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        name, field = key[len("optimizer."):].rsplit(".", 1)
        state.setdefault(index[name], {})[field] = value
    param_groups = [{**{k: v for k, v in g.items() if k != "params"},
                     "params": [index[n] for n in g["params"]]} for g in groups]
    for group in param_groups:  # JSON turns tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------
def save(folder: str, model: torch.nn.Module, state: dict, optimizer=None,
         generators: Optional[dict] = None, extra_files: Optional[dict] = None) -> None:
    """Write a checkpoint atomically (module docstring). ``state`` becomes train_state.json
    (it must hold "step"); ``optimizer`` (None: a model to load, not a run to resume) and
    ``generators`` ({"data": torch.Generator}) go to train_state.safetensors; extra_files
    {name: text} are written beside them (the byte tokenizer)."""
    from safetensors.torch import save_model

    folder, tmp, old = _twins(folder)
    if is_foreign(folder):
        raise FileExistsError(f"{folder} holds files but no minimoe checkpoint: not saving "
                              "there (it would replace them); choose another folder")
    recover(folder)  # a previous kill's leftovers: keep the complete checkpoint, drop the rest
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, WEIGHTS))
    _pause_for_tests()
    with open(os.path.join(tmp, CONFIG), "w") as handle:
        json.dump(model.cfg.to_dict(), handle, indent=2)
    state = dict(state)
    tensors = {f"rng.{name}": g.get_state() for name, g in (generators or {}).items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer_tensors, state["optimizer_param_groups"] = optimizer_to_tensors(optimizer, names)
        tensors.update(optimizer_tensors)
    save_file(tensors, os.path.join(tmp, STATE_TENSORS))
    for name, text in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w") as handle:
            handle.write(text)
    _carry_over(folder, tmp, set(extra_files or {}))
    for name in os.listdir(tmp):
        _fsync_file(os.path.join(tmp, name))
    write_json_atomic(os.path.join(tmp, STATE_JSON), state)  # the mark of completeness
    _fsync_dir(tmp)
    _pause_for_tests()
    if os.path.isdir(folder):
        os.replace(folder, old)
    _pause_for_tests()
    os.replace(tmp, folder)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))
    shutil.rmtree(old, ignore_errors=True)


def _carry_over(folder: str, tmp: str, written: set) -> None:
    """Copy what the run wrote beside its checkpoint (figures, notes) into the new one."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        source = os.path.join(folder, name)
        if name in CHECKPOINT_FILES or name in written:
            continue
        if os.path.isdir(source):  # e.g. a fine-tune's merged/ written inside the run folder
            shutil.copytree(source, os.path.join(tmp, name))
        else:
            shutil.copy2(source, os.path.join(tmp, name))


def read_config(folder: str) -> dict:
    """config.json of a run folder as a dict (a ModelConfig's fields)."""
    return read_json(os.path.join(folder, CONFIG))


def folder_kind(folder: str) -> str:
    """"run" (config.json is a ModelConfig: minimoe train, a merged LoRA), "adapters" (minimoe
    finetune's LoRA folder) or "published" (config.json with model_type, or anything else)."""
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        return "adapters"
    recover_if_interrupted(folder)
    try:
        return "published" if "model_type" in read_config(folder) else "run"
    except (OSError, ValueError, TypeError):
        return "published"


def load_model(folder: str, device="cpu"):
    """The Transformer of a run folder (after recovering from a kill during a save)."""
    from safetensors.torch import load_model as load_weights

    from minimoe.config import ModelConfig
    from minimoe.model import Transformer

    recover(folder)
    for name in (CONFIG, WEIGHTS):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"checkpoint file missing: {os.path.join(folder, name)}")
    cfg = ModelConfig.from_dict(read_config(folder))
    model = Transformer(cfg)  # cfg.fp8: FP8 layers, same parameter names
    load_weights(model, os.path.join(folder, WEIGHTS), strict=True)
    return model.to(device)


def load_training_state(folder: str, model: torch.nn.Module, optimizer,
                        generators: dict) -> None:
    """Restore the optimiser and the generators that ``save`` wrote (model: already loaded)."""
    path = os.path.join(folder, STATE_TENSORS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {folder} holds a model to load, not a "
                                "run to resume (e.g. a merged LoRA model)")
    tensors = load_file(path)
    state = read_state(folder)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer_from_tensors(optimizer, tensors, state["optimizer_param_groups"], names, path)
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
