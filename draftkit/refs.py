"""What users type to name a model, and where its weights are: a local directory, a ``.gguf`` file,
a hub id, or a short alias for one. Resolving a name reads nothing but the file system; a local model
folder (or a ``.gguf`` file's folder) that links outside itself is refused here, before any command
reads it (:mod:`draftkit.model_files`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from draftkit.errors import ModelLoadError
from draftkit.model_files import check_folder, check_gguf
from draftkit.resources import DEMO_TEACHER_NAME, demo_teacher

GGUF_SUFFIX = ".gguf"

# Short names users type for the usual draft and target checkpoints.
ALIASES: dict[str, str] = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.3-70b-instruct": "meta-llama/Llama-3.3-70B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-72b-instruct": "Qwen/Qwen2.5-72B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b-it": "google/gemma-2-9b-it",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "tinyllama-1.1b-chat": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
}

# The demo teacher shipped with the package (draftkit/resources.py), listed by `draftkit models`.
DEMO_TEACHER = demo_teacher()


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from (aliases resolved), and how the loaders reach it: all read off at once when the
    name is resolved."""

    name: str  # what the user typed
    location: str  # directory, .gguf file or hub id
    kind: Literal["dir", "gguf", "hub"]
    local: bool = field(init=False)  # a directory or a .gguf file, not a hub id
    hf_path: str = field(init=False)  # what ``from_pretrained`` takes as its first argument (a GGUF file's folder)
    # extra ``from_pretrained`` arguments: ``gguf_file`` for a GGUF file
    hf_kwargs: dict[str, str] = field(init=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        gguf = self.kind == "gguf"
        object.__setattr__(self, "local", self.kind != "hub")
        object.__setattr__(self, "hf_path", str(Path(self.location).parent) if gguf else self.location)
        object.__setattr__(self, "hf_kwargs", {"gguf_file": Path(self.location).name} if gguf else {})


def resolve_model_ref(name: str) -> ModelRef:
    """Resolve a directory, a ``.gguf`` file, an alias (``llama-3.1-8b``) or a hub id (``owner/name``).

    Raises:
        ModelLoadError: the name is none of these (the message names the closest aliases), or a local
            folder names or links to files outside itself.
    """
    name = str(name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
            ref = ModelRef(name, str(path), "gguf")
            check_gguf(path)
            return ref
        if path.is_dir() and (path / "config.json").is_file():
            ref = ModelRef(name, str(path), "dir")
            check_folder(path)
            return ref
        ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}")) if path.is_dir() else []
        if ggufs:
            raise ModelLoadError(f"{name} has no config.json but holds {', '.join(ggufs[:3])}: pass the .gguf file itself")
        raise ModelLoadError(f"{name} is not a model directory (no config.json in it) nor a .gguf file")
    if name.lower().endswith(GGUF_SUFFIX):
        raise ModelLoadError(f"{name}: no such GGUF file")
    if name in ALIASES:
        return ModelRef(name, ALIASES[name], "hub")
    if name == DEMO_TEACHER_NAME and DEMO_TEACHER.is_dir():
        return ModelRef(name, str(DEMO_TEACHER), "dir")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
    is_hub_id = name.count("/") == 1 and all(part and " " not in part for part in name.split("/"))
    if looks_like_path or not is_hub_id:
        close = difflib.get_close_matches(name.lower(), list(ALIASES) + [DEMO_TEACHER_NAME], n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `draftkit models` lists the aliases"
        kind = "no such model directory" if looks_like_path else "not a model directory, alias or hub id (owner/name)"
        raise ModelLoadError(f"{name}: {kind}{hint}")
    return ModelRef(name, name, "hub")
