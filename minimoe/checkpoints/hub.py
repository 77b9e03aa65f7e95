"""Downloading a checkpoint from the Hugging Face hub, only the shards a model needs.

The idea
--------
A published MoE checkpoint is large (DeepSeek-V3: 163 shards, ~690 GB in FP8), but every
tensor name says which layer it belongs to (``model.layers.{i}.``) and the index json
(``model.safetensors.index.json``, a few MB) says which shard holds each name. To look at
the first four layers we need the config, the tokenizer, the index and the shards that
hold layers 0..3, the embedding, the final norm and the head -- a few GB, not hundreds.

So a download is two steps:

1. fetch the small files: ``*.json`` and ``*.jinja`` (config.json, the index, tokenizer.json,
   tokenizer_config.json, generation_config.json, chat_template.jinja);
2. read the index, compute the shards that hold a needed tensor (``needed_shards``) and
   fetch exactly those (all ``*.safetensors`` when the repository has no index, i.e. one
   ``model.safetensors``).

Both steps go through ``huggingface_hub.snapshot_download(allow_patterns=...)``, which
keeps files in the shared hub cache: a second call finds them there and downloads nothing.
A tensor is *not* needed when it belongs to a decoder layer left out of ``layers`` (and,
with a subset, the multi-token-prediction modules, which ``minimoe.checkpoints.load.load_pretrained``
skips then: DeepSeek's layers after the last main layer, LongCat-Flash's ``model.mtp.*``);
every other tensor is.

What the reader should notice
-----------------------------
* The index is the table of contents of a checkpoint: reading a 10 MB json saves
  downloading hundreds of GB.
* Offline, without huggingface_hub, or for a repository that does not exist, the error
  says what is missing and that a local folder works everywhere (download it elsewhere,
  e.g. ``hf download OWNER/NAME --local-dir DIR``, and pass DIR).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

from minimoe.checkpoints.families import FAMILIES
from minimoe.checkpoints.shards import INDEX_FILE, weight_map_of

SMALL_FILE_PATTERNS = ["*.json", "*.jinja"]  # config, index, tokenizer, chat template
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# MTP modules stored under a prefix of their own, not numbered as layers (LongCat-Flash's)
_MTP_PREFIXES = tuple(sorted({f.names.mtp.prefix for f in FAMILIES
                              if "{index}" not in f.names.mtp.prefix}))


class HubDownloadError(OSError):
    """A hub repo id could not be fetched (offline, unknown or gated repository, ...)."""


def looks_like_repo_id(path: str) -> bool:
    """'owner/name' that is not an existing path and does not look like a local path."""
    return (not os.path.exists(path) and not path.startswith((".", "/", "~"))
            and path.count("/") == 1 and all(path.split("/")))


def needed_shards(weight_map: dict[str, str],
                  layers: Optional[Iterable[int]] = None) -> list[str]:
    """The shard files holding a tensor the model needs, sorted.

    weight_map: {tensor name: shard file} from the index json. layers: None = all tensors;
    else the decoder layers kept -- tensors ``model.layers.{i}.*`` of any other i (other
    main layers, and the MTP layers numbered from num_hidden_layers on) and LongCat-Flash's
    MTP module ``model.mtp.*`` are not needed. Everything else (embedding, final norm, head,
    ...) is.
    """
    keep = None if layers is None else {int(i) for i in layers}
    shards = set()
    for name, shard in weight_map.items():
        match = _LAYER.match(name)
        if keep is not None and match is not None and int(match.group(1)) not in keep:
            continue
        if keep is not None and name.startswith(_MTP_PREFIXES):
            continue
        shards.add(shard)
    return sorted(shards)


def _offline_hint(repo_id: str) -> str:
    return (f"Pass a local folder instead: on a machine with network access run "
            f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: huggingface-cli "
            f"download) "
            f"and give DIR (holding config.json and the *.safetensors files) in place of "
            f"{repo_id!r}.")


def _snapshot(repo_id: str, patterns: list[str], revision: Optional[str]) -> str:
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError(
            f"downloading {repo_id!r} from the Hugging Face hub needs the huggingface_hub package "
            f"(pip install 'minimoe[hub]'). {_offline_hint(repo_id)}") from error
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                 allow_patterns=patterns)
    except Exception as error:  # offline, unknown repo, gated repo, network, ...
        kind = type(error).__name__
        if kind == "RepositoryNotFoundError":
            why = ("the hub has no such repository (or it is private: log in with "
                   "`hf auth login`)")
        elif kind == "GatedRepoError":
            why = "the repository is gated: accept its terms on the hub and log in"
        elif kind == "RevisionNotFoundError":
            why = f"the repository has no revision {revision!r}"
        elif kind == "LocalEntryNotFoundError" or "offline" in str(error).lower():
            why = ("no network access (or HF_HUB_OFFLINE=1) and the files are not in the local "
                   "hub cache")
        else:
            why = f"{kind}: {error}"
        raise HubDownloadError(f"could not download {patterns} of {repo_id!r} from the Hugging "
                               f"Face hub: {why}. {_offline_hint(repo_id)}") from error


def download_checkpoint(repo_id: str, layers: Optional[Iterable[int]] = None,
                        revision: Optional[str] = None) -> str:
    """Fetch what loading ``repo_id`` (with ``layers``) needs; returns the local folder.

    Step 1 fetches the small json files, step 2 the needed shards (see the module docstring).
    Raises ImportError without huggingface_hub and HubDownloadError (an OSError) when the hub
    cannot deliver, both saying how to use a local folder instead.
    """
    folder = _snapshot(repo_id, SMALL_FILE_PATTERNS, revision)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise HubDownloadError(f"hub repository {repo_id!r} has no config.json: not a "
                               f"transformers checkpoint. {_offline_hint(repo_id)}")
    index_path = os.path.join(folder, INDEX_FILE)
    if not os.path.exists(index_path):
        return _snapshot(repo_id, ["*.safetensors"], revision)  # one model.safetensors
    weight_map = weight_map_of(folder)  # a malformed index is an error naming it
    return _snapshot(repo_id, needed_shards(weight_map, layers), revision)
