"""Memory estimates printed before the heavy work, the streaming decision, and the activation policy.

The estimate is arithmetic on the config and the checkpoint's size (no weights loaded):

* weights: the whole checkpoint when resident (an MoE's routed experts twice: transformers reads the per-expert
  tensors before fusing them, :func:`draftkit.moe.arch.moe_resident_bytes`); when streamed, one decoder layer (an
  MoE layer's plus the per-expert tensors on disk its largest fused expert parameter is built from:
  :func:`draftkit.moe.arch.moe_stream_bytes`);
* calibration activations: the hidden state of every token, waiting between two layers, and the output of the
  chunk of tokens going through the current layer (the engine replaces each chunk's input by its output,
  :func:`draftkit.engine.forward.through_layers`: one chunk of all the tokens is two whole copies); for sparsify
  over several chunks, what the suspended chunk forwards hold (:mod:`draftkit.sparsify.interleaved`,
  :func:`suspended_values_per_token`);
* a streamed run reads the embeddings once, before the first layer, to make the calibration hidden states: that
  phase (``embedding``: the embeddings and every token's hidden state) and the layer phase (the other parts) are
  never alive at once, so the host estimate is the larger of the two (measured at Llama-3.2-1B's width, prune at
  its default 64 x 1024 tokens: the sum said 1.91 GB, the run peaked at 1.29 GB, in the embedding phase);
* one layer forward on one chunk of tokens: about 10 hidden-wide and 3 MLP-wide float32 values per
  token, plus, with ``eager`` attention only, the attention scores (heads × sequence length per token);
* MoE layers: per token, the router's scores and, for each of its ``top_k`` experts, the gathered input
  and the expert's three intermediate values (:func:`draftkit.moe.arch.moe_values_per_token`);
* SparseGPT: the largest Hessian and its one work buffer ([columns, columns] float32 each), plus a
  float32 copy of the widest group of weights pruned together; Wanda: the largest Hessian (its diagonal scores
  the weights, the whole of it measures the reconstruction error) and a float32 copy of the widest linear;
* the Python process itself (torch and transformers imported): about 0.45 GB.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from draftkit.checkpoint.facts import checkpoint_bytes  # noqa: F401 (moved to the checkpoint facts)
from draftkit.errors import InvalidInputError
from draftkit.moe.arch import moe_memory

PROCESS_BYTES = int(0.45 * 2**30)
GB = 1e9


def available_host_bytes() -> int:
    """The memory available to a new allocation without swapping (psutil's ``available``: MemAvailable on Linux)."""
    import psutil

    return int(psutil.virtual_memory().available)


def available_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device; None for the CPU (the host figure applies)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


@dataclass
class MemoryEstimate:
    host: int
    device: int  # 0 on the CPU
    parts: dict[str, int] = field(default_factory=dict)
    activations_on: str = "cpu"
    streamed: bool = False

    def line(self) -> str:
        dev = f", device {self.device / GB:.2f} GB" if self.device else ""
        return f"memory estimate: host {self.host / GB:.2f} GB{dev} (activations on {self.activations_on})"


def suspended_values_per_token(tc) -> int:
    """Values per calibration token that sparsify holds while every chunk's forward waits at a group of linears
    (:mod:`draftkit.sparsify.interleaved`): the layer's input and the residual stream, the group's input and
    what the layer's code keeps beside it. The most is held at o_proj (the normed input, q, k, v and the attention
    output) or at down_proj (the MLP's normed input and its intermediate values). An MoE block adds its routing
    (:func:`draftkit.moe.arch.moe_values_per_token`), which :func:`estimate_memory` adds."""
    hidden = int(getattr(tc, "hidden_size", 4096))
    inter = int(getattr(tc, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(tc, "num_attention_heads", 32))
    head_dim = int(getattr(tc, "head_dim", None) or hidden // heads)
    kv = int(getattr(tc, "num_key_value_heads", None) or heads) * head_dim
    return 3 * hidden + max(inter, heads * head_dim + 2 * kv)


def estimate_memory(config, *, ckpt_bytes: int, streamed: bool, device: torch.device, tokens: int,
                    seqlen: int, chunk_tokens: int, sparsegpt: bool, dtype_bytes: int = 4,
                    act_bytes: int | None = None, sparsify: str | None = None) -> MemoryEstimate:
    """Peak memory of a calibration run (prune scoring or sparsify), by the parts listed above; weights take
    ``dtype_bytes`` per value, activations ``act_bytes`` (the compute dtype's; default: the weights').
    ``sparsify``: the sparsify method of a sparsify run (its activations and Hessians), None for the others."""
    act = act_bytes or dtype_bytes
    sparsegpt = sparsegpt or sparsify == "sparsegpt"
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(tc, "hidden_size", 4096))
    inter = int(getattr(tc, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(tc, "num_attention_heads", 32))
    vocab = int(getattr(tc, "vocab_size", 32000))
    n_layers = max(1, int(getattr(tc, "num_hidden_layers", 1)))
    embed = vocab * hidden * dtype_bytes
    outside = embed * (1 if getattr(tc, "tie_word_embeddings", False) else 2)
    layer = max(0, ckpt_bytes - outside) // n_layers
    interleaved = sparsify in ("sparsegpt", "wanda") and chunk_tokens < tokens
    suspended = suspended_values_per_token(tc) if interleaved else 0
    attention = 2 * heads * min(seqlen, chunk_tokens) if _eager_attention(tc) else 0
    moe = moe_memory(tc, dtype_bytes)  # every MoE term in one call (0 for a dense config)
    waiting = tokens * act * hidden  # every token's hidden state between two layers
    parts = {
        "weights": ckpt_bytes + moe.resident_bytes if not streamed else layer + moe.stream_bytes,
        "activations": (tokens * act * (suspended + moe.values_per_token) if interleaved
                        else waiting + min(chunk_tokens, tokens) * act * hidden),
        "layer_forward": chunk_tokens * min(4, act_bytes or 4) * (
            10 * hidden + 3 * inter + attention + moe.values_per_token),
    }
    cols = max(hidden, inter)
    if sparsegpt:
        parts["hessian"] = 2 * cols * cols * 4 + 2 * max(2 * inter, 3 * hidden) * hidden * 4
    elif sparsify == "wanda":
        parts["hessian"] = cols * cols * 4 + inter * hidden * 4
    compute = sum(parts.values()) - parts["activations"]
    if streamed:  # read once before the first layer, with the hidden states it makes; freed before the layers run
        parts["embedding"] = embed + waiting
    first = parts.get("embedding", 0)
    if device.type == "cuda":
        free = available_device_bytes(device) or 0
        on_device = compute + parts["activations"] <= 0.8 * free
        dev = max(compute + (parts["activations"] if on_device else 0), first if on_device else embed if streamed else 0)
        host = PROCESS_BYTES + (0 if on_device else parts["activations"]) + (layer if streamed else 0)
        return MemoryEstimate(host, dev, parts, "cuda" if on_device else "cpu")
    return MemoryEstimate(PROCESS_BYTES + max(compute + parts["activations"], first), 0, parts, "cpu")


def _eager_attention(tc) -> bool:
    """Whether attention materializes its [heads, seq, seq] scores: transformers' ``eager`` implementation.
    The default, ``sdpa`` (chosen when the config names none), computes them block by block."""
    return getattr(tc, "_attn_implementation", None) == "eager"


def check_fits(est: MemoryEstimate, *, streamed: bool, can_stream: bool, device: torch.device) -> None:
    """One line saying what to change when the estimate does not fit, before anything is loaded.

    Raises:
        InvalidInputError: the run needs more host or device memory than is available.
    """
    host_free = available_host_bytes()
    if est.host > host_free:
        if not streamed and not can_stream:
            fix = ("the checkpoint is not safetensors, so it cannot be streamed layer by layer: convert it "
                   "(save_pretrained(safe_serialization=True)) or use a machine with more memory")
        elif not streamed:
            fix = "pass --stream on to read one decoder layer at a time"
        else:
            fix = "use --device cuda, a smaller --chunk-tokens, or fewer --samples"
        raise InvalidInputError(
            f"this run needs about {est.host / GB:.1f} GB of host memory but {host_free / GB:.1f} GB is "
            f"available: {fix}"
        )
    dev_free = available_device_bytes(device)
    if dev_free is not None and est.device > dev_free:
        raise InvalidInputError(
            f"this run needs about {est.device / GB:.1f} GB on {device} but {dev_free / GB:.1f} GB is free: "
            + ("pass --stream on, " if not streamed and can_stream else "")
            + "use a smaller --chunk-tokens, fewer --samples, or --device cpu"
        )


def activation_device(est: MemoryEstimate, device: torch.device) -> torch.device:
    """Where the calibration activations live between layers: on the compute device when the estimate
    says they fit there, on the CPU otherwise."""
    return device if est.activations_on == device.type else torch.device("cpu")


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (Linux ``/proc/self/maps``; empty elsewhere)."""
    try:
        lines = open("/proc/self/maps", encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return sorted(ranges)


def maps_a_file(model) -> bool:
    """Whether some of ``model``'s CPU weights are pages of a file mapping (a safetensors checkpoint read by
    transformers is mapped, not copied). Such a model keeps resident every page any stage touched, the saving
    and the layers a prune dropped included, for as long as it lives; the next stage maps the saved output
    again at almost no cost and holds only the pages it reads (measured at Llama-3.2-1B's width, 4 layers,
    prune then Wanda: 2184 MB handed on against 1380 MB for the Wanda command)."""
    import bisect

    ranges = _file_mappings()
    if not ranges:
        return False
    starts = [lo for lo, _ in ranges]
    for t in model.parameters():
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        ptr = t.data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < ranges[i][1]:
            return True
    return False


def fits_comfortably(model) -> bool:
    """Whether a recipe keeps a stage's model in memory for the next stage: at most the size up to which
    checkpoints stay resident (:data:`~draftkit.checkpoint.stream.STREAM_ABOVE_BYTES`), a quarter of the
    memory still free where it lives, and weights of its own (not pages of a mapped file,
    :func:`maps_a_file`). Otherwise the next stage reads the saved output, streamed by its rule."""
    from draftkit.checkpoint.stream import STREAM_ABOVE_BYTES

    if model is None or maps_a_file(model):
        return False
    seen: set[int] = set()
    size, device = 0, torch.device("cpu")
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            size += t.numel() * t.element_size()
            device = t.device
    free = available_device_bytes(device) if device.type == "cuda" else available_host_bytes()
    return size <= STREAM_ABOVE_BYTES and size <= 0.25 * (free or 0)


_chosen_store: ContextVar[torch.device | None] = ContextVar("draftkit_activation_store", default=None)


@contextmanager
def activation_store(device: torch.device | None) -> Iterator[None]:
    """Within this block, a resident layer-wise run (:class:`~draftkit.engine.layers.ResidentLayers`) keeps its
    activations on ``device``: the placement the memory estimate chose (:func:`activation_device`), as a
    streamed run's ``source.store`` is set."""
    token = _chosen_store.set(device)
    try:
        yield
    finally:
        _chosen_store.reset(token)


def chosen_activation_store() -> torch.device | None:
    """The placement set by :func:`activation_store`; None outside one (activations stay where they are made)."""
    return _chosen_store.get()


def gb(n: int) -> float:
    return round(n / GB, 3) if n else 0.0



_pending: list[MemoryEstimate] = []
_pending_compute: list[str] = []


def announce_compute(line: str | None) -> None:
    """Keep the compute-dtype choice (``compute bfloat16 (auto: ...)``) for the estimate line, printed like the
    estimate once the heavy work starts (or at the end of :func:`estimate_line` when a stage never says so)."""
    _pending_compute[:] = [line] if line else []


@contextlib.contextmanager
def estimate_line(*, flush: bool = True) -> Iterator[None]:
    """Around a stage: on an error the pending estimate line is forgotten (the error is the one line printed);
    with ``flush``, what is still pending once the block succeeds (a stage that never said its heavy work
    started) is printed then."""
    try:
        yield
    except BaseException:
        _pending.clear()
        _pending_compute.clear()
        raise
    if flush:
        heavy_work_starts()


def announce_before_heavy_work(estimate: MemoryEstimate) -> None:
    """Keep the estimate until :func:`heavy_work_starts`: so bad settings or data found before then
    still give a single line. Runs without a calibration forward (``prune --drop``, magnitude) copy
    or edit one tensor at a time and print nothing (not even the compute dtype)."""
    _pending[:] = [estimate] if "activations" in estimate.parts else []
    if not _pending:
        _pending_compute.clear()  # no forward runs: no compute dtype to speak of either


def heavy_work_starts() -> None:
    """Print the pending estimate (once), right before the calibration forward or the tensor copy."""
    from draftkit import console

    compute = _pending_compute.pop() if _pending_compute else None
    if _pending:
        est = _pending.pop()
        more = f"; {compute}" if compute else ""
        console.info(f"{est.line()}; {'streamed one layer at a time' if est.streamed else 'resident'}{more}")
    elif compute:
        console.info(compute)


_libc: ctypes.CDLL | None = None


def release_freed_memory() -> None:
    """Hand the heap pages freed since the last call back to the OS (glibc's ``malloc_trim``).

    glibc keeps freed pages of the heap for reuse, so a loop that reads, uses and frees one decoder layer
    after another grows its RSS by a fragment of each layer, i.e. with the depth. A no-op where the C library has no ``malloc_trim`` (macOS, musl).
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_ARENA_MAX = -8  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def share_one_heap() -> None:
    """Make memory freed by one thread reusable by the others, and large blocks go back to the OS when freed
    (glibc ``mallopt``: ``M_ARENA_MAX`` 1 and a fixed 1 MiB ``M_MMAP_THRESHOLD``).

    glibc gives each new thread a heap ("arena") of its own and keeps what a thread frees in its heap for that
    heap's next allocations; blocks above the mmap threshold are mapped and unmapped instead, but the threshold
    grows with the blocks freed (up to 32 MiB), so a chunk's activations (a few MiB each) end up in the heaps.
    Chunked sparsify runs each chunk's layer forward in a thread of its own (:mod:`draftkit.sparsify.interleaved`):
    with a heap each, every chunk's freed transients stayed reserved (peak RSS 1.82 GB for 8 chunks of 4096 tokens
    on SmolLM2-135M against 1.55 GB for one chunk of 32768). The threads never allocate at the same time (one runs
    at a time), so sharing costs no lock contention; mapping each large block costs its page faults, as the single
    pass's blocks (all above 32 MiB) always did. A no-op where the C library has no ``mallopt``.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(M_ARENA_MAX, 1)
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def collect_released_models() -> None:
    """Free a model nothing refers to any more, also when reference cycles hold it (a training's optimizer, hooks
    and closures can; only the cycle collector frees those), and hand its pages back to the OS."""
    import gc

    gc.collect()
    release_freed_memory()
