"""``draftkit export``: decide what to write for a model (sparse-bitmask safetensors or dense) and write it;
``draftkit decompress`` turns a sparse-bitmask checkpoint into dense safetensors.

The layout is :mod:`draftkit.bitmask`'s (compressed-tensors' ``sparse-bitmask`` as written up to 0.14);
reading any checkpoint back is :func:`draftkit.checkpoint.load_model`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torch import nn

from draftkit import console
from draftkit.bitmask import (
    LAYOUT_VERSION,
    PARAM_NAMES,
    QUANT_METHOD,
    SPARSE_FORMAT,
    compress_state_dict,
    theoretical_layout_bytes,
)
from draftkit.checkpoint import (
    SAFE_INDEX,
    LazyCheckpoint,
    is_quantized_too,
    is_sparse_checkpoint,
    nbytes,
    parse_size,
    torch_dtype,
    weight_files,
    write_safetensors,
)
from draftkit.errors import InvalidInputError, ModelLoadError
from draftkit.moe.layout import StoredLayout, stored_layout
from draftkit.provenance import PROVENANCE_FILE, make_provenance
from draftkit.sparsify.masks import count_zeros, is_nm_sparse, target_linears, tensor_sparsity

LOAD_HINT = "load: python -c \"import draftkit; m = draftkit.load_model('{out}')\"  (transformers 5 with compressed-tensors 0.15+ cannot read sparse-bitmask)"
SERVE_HINT = ("serve: draftkit decompress {out} -o {out}-dense, then serve {out}-dense as the draft (this sparse form is an "
              "archival/transport format; `draftkit export DRAFT --format dense --serve vllm|sglang|hf --target TARGET` "
              "checks the pair and writes the command)")


class ExportConfig(BaseModel):
    """Settings of ``draftkit export``."""

    model_config = ConfigDict(extra="forbid")
    # set from --trust-remote-code (load.trust_remote_code) by :func:`draftkit.stages.trusting`: the other model
    # this stage loads (eval's baseline, spec's target, export's serving target) may run its repository's code
    _trust_remote_code: bool = PrivateAttr(False)

    format: Literal["auto", "sparse", "dense"] = Field(
        "auto", description="sparse (bitmask layout), dense (zeros in place), or auto: sparse when the model has sparse linears"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the written weights; auto keeps the model's"
    )
    max_shard_size: str = Field("5GB", description="largest safetensors shard, e.g. 5GB or 500MB")
    min_sparsity: float = Field(
        0.1, ge=0.0, lt=1.0, description="compress a decoder linear weight only when at least this fraction of it is zero"
    )
    serve: Literal["vllm", "sglang", "hf"] | None = Field(
        None, description="check the draft against --target for this engine and write the invocation (draftkit/serve.py)"
    )
    target: str | None = Field(None, description="the target the draft will be served with (for --serve)")
    speculative_tokens: int = Field(4, ge=1, description="draft tokens per step in the written invocation (for --serve)")

    @model_validator(mode="after")
    def _serve_needs_target(self):
        if self.serve and not self.target:
            raise ValueError(f"serve={self.serve} needs the target the draft will be served with: add target=MODEL (--target)")
        return self

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        parse_size(v)
        return v


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the second copy of tied tensors (as ``save_pretrained`` drops it)."""
    state = model.state_dict()
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t
    return out


def sparse_modules(model: nn.Module, min_sparsity: float) -> dict[str, float]:
    """Decoder linears whose weight has at least ``min_sparsity`` zeros (and any zero), with their sparsity."""
    out = {}
    for name, lin in target_linears(model).items():
        s = tensor_sparsity(lin.weight)
        if s > 0 and s >= min_sparsity:
            out[name] = s
    return out


def sparsity_structure(state: dict[str, torch.Tensor], modules: list[str]) -> str:
    if modules and all(is_nm_sparse(state[f"{m}.weight"], 2, 4) for m in modules):
        return "2:4"
    return "unstructured"


def stored_targets(model: nn.Module, state: dict[str, torch.Tensor], min_sparsity: float) -> tuple[StoredLayout, list[str]]:
    """``state`` in the layout checkpoints store (an MoE's fused experts as one 2-D weight per expert and
    projection, :mod:`draftkit.moe.layout`) and the weights to compress there: the sparse decoder linears and
    the sparse expert weights, by stored module name."""
    layout = stored_layout(model, state, list(target_linears(model)))
    modules = [layout.rename.get(m, m) for m in sparse_modules(model, min_sparsity)]
    for key in layout.experts:
        s = tensor_sparsity(layout.state[key])
        if s > 0 and s >= min_sparsity:
            modules.append(key.removesuffix(".weight"))
    return layout, modules


def global_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all parameters (as llm-compressor's ``infer_global_sparsity``)."""
    zeros = total = 0
    for t in _state_dict_for_save(model).values():
        if t.is_floating_point():
            zeros += count_zeros(t)
            total += t.numel()
    return zeros / total if total else 0.0


def make_sparsity_config(model: nn.Module, modules: list[str], layout: StoredLayout) -> dict[str, Any]:
    """``sparsity_config`` exactly as compressed-tensors 0.14's ``BitmaskConfig.model_dump()`` wrote it (module
    names as stored: ``modules`` and ``layout``, :func:`stored_targets`)."""
    compressed = set(modules)
    ignore = [layout.rename.get(name, name) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and layout.rename.get(name, name) not in compressed]
    return {
        "registry_requires_subclass": False,
        "format": SPARSE_FORMAT,
        "targets": ["Linear"],
        "ignore": ignore,
        "global_sparsity": global_sparsity(model),
        "sparsity_structure": sparsity_structure(layout.state, modules),
    }


def check_export(hf_config, cfg: ExportConfig) -> None:
    """Before the weights load: the serving target must be a model draftkit can find."""
    if cfg.target:
        from draftkit.refs import resolve_model_ref

        resolve_model_ref(cfg.target)


def export_stage(model: nn.Module, tokenizer, cfg: ExportConfig):
    """Decide the format (the model is not changed; the files are written by :func:`write_export`)."""
    _, modules = stored_targets(model, _state_dict_for_save(model), cfg.min_sparsity)
    fmt = cfg.format if cfg.format != "auto" else ("sparse" if modules else "dense")
    if fmt == "sparse" and not modules:
        raise InvalidInputError(
            f"the model has no sparse linear or expert weights (none with >= {cfg.min_sparsity:.0%} zeros): "
            "export it with --format dense, or sparsify it first (draftkit sparsify)"
        )
    dtype = cfg.dtype if cfg.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
    report = {"format": fmt, "dtype": dtype, "compressed_modules": len(modules) if fmt == "sparse" else 0}
    return model, report


def write_export(model: nn.Module, tokenizer, out: str | os.PathLike, provenance: dict[str, Any],
                 cfg: ExportConfig, overwrite: bool = False) -> dict[str, Any]:
    """The export stage's writer: weights (sparse or dense), config, tokenizer, model card, provenance."""
    from draftkit.atomic import atomic_dir, atomic_write_json

    fmt = provenance["facts"].get("format") or export_stage(model, tokenizer, cfg)[1]["format"]
    state = _state_dict_for_save(model)
    if cfg.dtype != "auto":
        want = torch_dtype(cfg.dtype)
        state = {k: v.to(want) if v.is_floating_point() else v for k, v in state.items()}
    stored, targets = stored_targets(model, state, cfg.min_sparsity)  # an MoE's experts one by one, as stored
    state = stored.state
    dense_bytes = sum(nbytes(t) for t in state.values())
    modules = targets if fmt == "sparse" else []
    from draftkit.memory import release_freed_memory
    from draftkit.memory_stages import announce, export_estimate

    report: dict[str, Any] = {"memory_estimate_gb": announce(export_estimate(model, state, modules),
                                                             "whole model in memory")}
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if fmt == "sparse":
            # each weight's mask and index temporaries handed back at once: left to malloc, the freed pages of
            # one weight sit between the next ones' kept tensors and the peak varied by a model's size run to run
            tensors = compress_state_dict(state, modules, after_each=release_freed_memory)
            theory = 0.0
            layout = 0
            for m in modules:
                w = state[f"{m}.weight"]
                s = count_zeros(w) / w.numel()
                theory += theoretical_layout_bytes(w.shape, s, w.element_size())
                layout += sum(nbytes(tensors[f"{m}.{k}"]) for k in PARAM_NAMES)
            others = sum(nbytes(t) for n, t in tensors.items() if n.rpartition(".")[0] not in set(modules))
            sc = make_sparsity_config(model, modules, stored)
            report.update(
                sparsity_structure=sc["sparsity_structure"],
                global_sparsity=round(sc["global_sparsity"], 6),
                target_sparsity=_target_sparsity(state, modules),
                theoretical_bytes=int(round(theory + others)),
                layout_tensor_bytes=layout + others,
            )
        else:
            tensors = state
            sc = None
        files = write_safetensors(tensors, tmp, max_shard_size=cfg.max_shard_size)
        config: Any = getattr(model, "config")  # noqa: B009 - the transformers config
        config.save_pretrained(tmp)
        if cfg.dtype != "auto":
            _set_config_dtype(tmp / "config.json", cfg.dtype)
        if sc is not None:
            _add_sparsity_config(tmp / "config.json", sc)
        else:  # what is meant to be served never carries a sparsity_config
            _drop_sparsity_config(tmp / "config.json")
        gen: Any = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # noqa: BLE001 - an odd generation config must not fail the export
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(out, fmt, report))
        if cfg.serve:
            from draftkit.serve import check_serving, write_serving

            assert cfg.target is not None  # ExportConfig requires a target with serve
            serve = check_serving(tmp, cfg.target, cfg.serve, k=cfg.speculative_tokens, served_as=out,
                                  trust_remote_code=cfg._trust_remote_code)
            serve["draft"] = str(out)
            write_serving(tmp, serve)
            report["serve"] = serve
        atomic_write_json(tmp / PROVENANCE_FILE, {**provenance, "facts": {**provenance["facts"], **report}})
        disk = sum((tmp / f).stat().st_size for f in files)
    report.update(
        files=files,
        bytes_on_disk=disk,
        dense_bytes=dense_bytes,
        ratio_to_dense=round(disk / dense_bytes, 4) if dense_bytes else None,
    )
    if fmt == "sparse":
        report["ratio_to_theory"] = round(disk / report["theoretical_bytes"], 4)
        report["load_hint"] = LOAD_HINT.format(out=out)
        report["serve_hint"] = SERVE_HINT.format(out=out)
    return report


def _target_sparsity(state: dict[str, torch.Tensor], modules: list[str]) -> float:
    zeros = total = 0
    for m in modules:
        w = state[f"{m}.weight"]
        zeros += count_zeros(w)
        total += w.numel()
    return round(zeros / total, 6) if total else 0.0


def _set_config_dtype(config_file: Path, dtype: str) -> None:
    data = json.loads(config_file.read_text())
    data["dtype"] = dtype
    if "torch_dtype" in data:
        data["torch_dtype"] = dtype
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _drop_sparsity_config(config_file: Path) -> None:
    data = json.loads(config_file.read_text())
    qc = data.get("quantization_config")
    if isinstance(qc, dict) and "sparsity_config" in qc:
        qc.pop("sparsity_config")
        if not {k for k in qc if k not in ("version", "quant_method", "transform_config")}:
            data.pop("quantization_config")
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _add_sparsity_config(config_file: Path, sparsity_config: dict[str, Any]) -> None:
    """Write ``quantization_config`` the way ``ModelCompressor.update_config`` (0.14) did."""
    data = json.loads(config_file.read_text())
    data["quantization_config"] = {
        "version": LAYOUT_VERSION,
        "quant_method": QUANT_METHOD,
        "sparsity_config": sparsity_config,
        "transform_config": {},
    }
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card(out: Path, fmt: str, report: dict[str, Any]) -> str:
    lines = [f"# {out.name}", "", "Written by `draftkit export`.", ""]
    if fmt == "sparse":
        lines += [
            f"Sparse safetensors in the compressed-tensors `sparse-bitmask` layout (as written up to compressed-tensors 0.14); "
            f"structure {report.get('sparsity_structure')}, sparsity of the compressed linears {report.get('target_sparsity')}.",
            "",
            "transformers 5 with compressed-tensors 0.15+ fails on this checkpoint (`AttributeError` on `config_groups`), "
            "and recent vLLM no longer reads the format. Use:",
            "",
            "```",
            LOAD_HINT.format(out=out.name),
            SERVE_HINT.format(out=out.name),
            "```",
        ]
    else:
        lines += ["Dense safetensors (pruned weights stored as zeros): loads with `AutoModelForCausalLM.from_pretrained`, "
                  "vLLM (`vllm serve`) and llama.cpp converters."]
    return "\n".join(lines) + "\n"


def decompress(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
               max_shard_size: str = "5GB") -> dict[str, Any]:
    """Turn a ``sparse-bitmask`` checkpoint into dense safetensors; other files are copied, the
    sparsity part of ``quantization_config`` is removed. Nothing is loaded into a model."""
    from draftkit.atomic import atomic_dir, atomic_write_json, check_output_dir
    from draftkit.model_files import check_folder

    src = Path(src)
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src} is not a model directory (no config.json in it)")
    check_folder(src)  # nothing it copies or reads may come from outside it
    if not is_sparse_checkpoint(src):
        raise InvalidInputError(f"{src} is not a sparse-bitmask checkpoint: it is dense already, nothing to decompress")
    if is_quantized_too(src):
        raise InvalidInputError(f"{src} is quantized as well as sparse: decompress it with compressed-tensors")
    out = check_output_dir(out, overwrite=overwrite, inputs=(str(src),))
    ckpt = LazyCheckpoint(src)  # the one checked reader: resolved files, consistent layouts
    tensors = ckpt.read(ckpt.keys())
    stored = {f.name for f in weight_files(src)} | {SAFE_INDEX}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        files = write_safetensors(tensors, tmp, max_shard_size=max_shard_size)
        for f in src.iterdir():
            if f.is_file() and f.name not in stored and f.name not in ("README.md", PROVENANCE_FILE):
                shutil.copy2(f, tmp / f.name)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        disk = sum((tmp / f).stat().st_size for f in files)
        report = {"output": str(out), "files": files, "bytes_on_disk": disk, "tensors": len(tensors)}
        atomic_write_json(tmp / PROVENANCE_FILE, make_provenance(stage="decompress", source=str(src), arguments={}, facts=report))
    console.info(f"decompressed {src} -> {out}")
    return report
