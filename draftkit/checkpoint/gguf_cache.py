"""A GGUF file converted once: every stage, ``recipes validate`` and ``--dry-run`` read the converted folder.

transformers' GGUF reader dequantizes the whole file on every load (about 20 s for SmolLM2-135M). The first
load of a ``.gguf`` file's model or tokenizer (:func:`draftkit.checkpoint.load.load_model`,
``load_tokenizer``) writes the dequantized model, tokenizer and config as an ordinary safetensors folder under
``<cache>/gguf/<content hash of the file>`` (``DRAFTKIT_CACHE_DIR``); later reads of the same bytes (any path,
any process, configs included) use that folder. A changed file has another hash, hence another folder.
``DRAFTKIT_GGUF_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

from draftkit.refs import ModelRef

DONE = ".converted"  # written last: a folder without it is not used


def enabled() -> bool:
    return os.environ.get("DRAFTKIT_GGUF_CACHE", "1").lower() not in ("0", "false", "no", "off")


def cache_folder(gguf_file: str | os.PathLike) -> Path:
    from draftkit.atomic import cache_root
    from draftkit.fingerprint import file_sha256

    return cache_root() / "gguf" / file_sha256(gguf_file)[:24]


def lookup(ref: ModelRef) -> ModelRef:
    """The converted folder of a GGUF ``ref`` when it is cached; otherwise ``ref`` itself."""
    if ref.kind != "gguf" or not enabled():
        return ref
    folder = cache_folder(ref.location)
    if not (folder / DONE).is_file():
        return ref
    from draftkit.cachelimit import touch

    touch(folder)  # recently used: DRAFTKIT_CACHE_LIMIT evicts it last
    return ModelRef(ref.name, str(folder), "dir")


def store(ref: ModelRef, model, tokenizer) -> ModelRef:
    """Write the dequantized ``model`` and ``tokenizer`` of ``ref`` into the cache; returns the cached ref
    (``ref`` itself when the cache cannot be written: every load then converts again, nothing else changes)."""
    from draftkit import console
    from draftkit.atomic import atomic_dir
    from draftkit.errors import OutputExistsError

    if not enabled():
        return ref
    folder = cache_folder(ref.location)
    try:
        with atomic_dir(folder, overwrite=folder.exists()) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / DONE).write_text(f"{ref.location}\n")
    except OutputExistsError:  # another process converted the same file meanwhile
        pass
    except OSError as exc:
        console.warn(f"could not cache the converted GGUF in {folder}: {exc}")
    from draftkit.cachelimit import enforce_limit

    enforce_limit()  # DRAFTKIT_CACHE_LIMIT
    return lookup(ref)
