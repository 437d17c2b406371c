"""Several chunks of calibration tokens through one decoder layer, each chunk's forward run once.

SparseGPT's true-sequential order needs, for each group of linears (q/k/v, o, gate/up, down), the inputs of
*every* calibration token before the group is pruned, and those inputs depend on the groups pruned before it.
Running all tokens in one forward does that but holds one layer's transient activations for all of them (a
SmolLM2-135M MLP over 32768 tokens: about 0.6 GB); re-running each chunk's forward up to the next group
recomputes the layer's prefix once per group (2.5x the time, measured).

Here every chunk's layer forward runs in a thread of its own, and a forward pre-hook on each targeted linear
*suspends* it at the linear's input until the driver has pruned that linear. The driver resumes one chunk at a
time, so exactly one forward computes at any moment (no parallelism, no races: the threads are coroutines).
Once every chunk waits at the same linear, its Hessian is summed over the chunks (in chunk order, float32),
the group is pruned, and each chunk resumes with the pruned weights, up to its next linear. Each chunk's forward
runs exactly once, and what stays alive between groups is what the suspended forwards still hold (the residual
stream, the group's input): a few hidden-wide values per token, while the transients (the attention
internals, the MLP's intermediate products) exist for one chunk at a time.

Routed experts are called only by the chunks that route tokens to them, so chunks may wait at different
linears: the one to prune next is the first in registration order (the execution order of decoder layers and
of draftkit's expert loop), with the chunks that wait at it. A chunk that later calls a linear pruned without
its tokens would break that assumption; it raises instead of silently using a partial Hessian.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable

import torch
from torch import nn

from draftkit.memory import share_one_heap
from draftkit.sparsify.pruner import LayerPruner, _Group
from draftkit.sparsify.sparsegpt import accumulate_hessian, make_empty_hessian


class _Abort(BaseException):
    """Ends a suspended forward when the driver stops early (an error elsewhere, an interrupt)."""


class ChunkForward:
    """One chunk's layer forward in its own thread, suspended at each targeted linear's input."""

    def __init__(self, index: int, run: Callable[[], torch.Tensor], back: threading.Semaphore):
        self.index = index
        self.waiting: tuple[nn.Module, torch.Tensor] | None = None  # the linear it waits at, and that linear's input
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None
        self._run: Callable[[], torch.Tensor] | None = run
        self._go = threading.Semaphore(0)
        self._back = back
        self._abort = False
        # the driver's context variables (the compute dtype) hold in the thread too
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._main,), daemon=True,
                                       name=f"draftkit-chunk-{index}")

    def _main(self) -> None:
        try:
            run, self._run = self._run, None  # the closure and its chunk input go with this frame
            assert run is not None
            with torch.no_grad():  # grad mode is per thread
                self.out = run()
        except _Abort:
            pass
        except BaseException as exc:  # handed to the driver's thread
            self.error = exc
        finally:
            self.waiting = None
            self._back.release()

    def suspend(self, module: nn.Module, x: torch.Tensor) -> None:
        """In the chunk's thread: wait here until the driver resumes it."""
        self.waiting = (module, x)
        self._back.release()
        self._go.acquire()
        self.waiting = None
        if self._abort:
            raise _Abort

    def step(self) -> None:
        """In the driver's thread: run the chunk until it suspends again or ends."""
        if self.thread.ident is None:
            self.thread.start()
        else:
            self._go.release()
        self._back.acquire()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def stop(self) -> None:
        if self.thread.is_alive():
            self._abort = True
            self._go.release()
            self.thread.join()


@torch.no_grad()
def prune_layer_interleaved(layer: nn.Module, targets: dict[str, nn.Linear], pruner: LayerPruner,
                            runs: list[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    """Prune the ``targets`` of ``layer`` group by group over every chunk; return the layer's output per chunk.
    ``runs[c]()`` runs chunk ``c``'s forward through the layer once (the engine's,
    :func:`draftkit.engine.forward.one_shot_runs`: each chunk's input is freed as soon as its forward no longer
    needs it).

    As in the single-pass driver, linears called with the same input tensor (q/k/v; gate/up) share one
    Hessian and H⁻¹ factor, and the groups learnt here let the next layers prune them in one column loop.
    """
    order = {lin: k for k, lin in enumerate(targets.values())}
    by_relative = {pruner.relative.get(lin, name): lin for name, lin in targets.items()}
    back = threading.Semaphore(0)
    chunks: list[ChunkForward] = []
    by_thread: dict[int, ChunkForward] = {}
    pruned_in: dict[str, tuple[int, frozenset[int]]] = {}  # linear -> (its group's number, the chunks it saw)

    def hook(module, inputs):
        chunk = by_thread.get(threading.get_ident())
        if chunk is None:
            return None
        name = pruner.names[module]
        x = inputs[0]
        if name in pruner.pruned:
            number, seen = pruned_in.get(name, (-1, frozenset()))
            if chunk.index not in seen:
                raise RuntimeError(f"{name} was called by calibration chunk {chunk.index} after it was pruned from the "
                                   "other chunks' inputs (the chunks call this layer's linears in different orders); "
                                   "pass a --chunk-tokens that holds every calibration token")
            if number != len(groups) - 1 or group_xs.get(chunk.index) is not x:
                raise RuntimeError(f"{name} was pruned with its siblings' Hessian but reads another input")
            return None
        chunk.suspend(module, x)
        return None

    def run_chunk(c: int) -> Callable[[], torch.Tensor]:
        box = [runs[c]]
        runs[c] = None  # type: ignore[call-overload]

        def run() -> torch.Tensor:
            by_thread[threading.get_ident()] = chunks[c]
            forward = box.pop()
            return forward()

        return run

    share_one_heap()  # else each chunk's thread keeps its freed transients in a heap of its own
    handles = [lin.register_forward_pre_hook(hook) for lin in targets.values()]
    group: _Group | None = None
    group_xs: dict[int, torch.Tensor] = {}
    groups: list[list[nn.Module]] = []
    try:
        for c in range(len(runs)):
            chunks.append(ChunkForward(c, run_chunk(c), back))
            chunks[c].step()
        while True:
            waiting = [ch for ch in chunks if ch.waiting is not None]
            if not waiting:
                break
            lead = min((ch.waiting[0] for ch in waiting if ch.waiting), key=order.__getitem__)
            mine = [ch for ch in waiting if ch.waiting and ch.waiting[0] is lead]
            xs = {ch.index: ch.waiting[1] for ch in mine if ch.waiting}
            if group is None or group_xs.keys() != xs.keys() or any(group_xs[i] is not x for i, x in xs.items()):
                group, group_xs = _Group(), xs  # the previous group's Hessian and inputs are freed here
                group.H = make_empty_hessian(lead.in_features, device=lead.weight.device)
                for i in sorted(xs):
                    group.H, group.tokens = accumulate_hessian(group.H, xs[i], group.tokens)
                groups.append([])
            rel = pruner.relative.get(lead, pruner.names[lead])
            members = [lead] + [
                by_relative[r] for r in pruner.siblings.get(rel, ())
                if r != rel and r in by_relative and pruner.names[by_relative[r]] not in pruner.pruned
            ]
            group.members.extend(pruner.names[m] for m in members)
            groups[-1].extend(members)
            pruner.prune_group(members, group)
            for m in members:
                pruned_in[pruner.names[m]] = (len(groups) - 1, frozenset(group_xs))
            del waiting, mine, xs
            for ch in sorted(group_xs):
                chunks[ch].step()
    finally:
        for h in handles:
            h.remove()
        for ch in chunks:
            ch.stop()
    for members in groups:
        pruner.learn_group(members)
    outs = [ch.out for ch in chunks]
    assert all(o is not None for o in outs)
    return outs  # type: ignore[return-value]
