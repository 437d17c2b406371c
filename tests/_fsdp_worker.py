"""One rank of tests/test_distill_fsdp.py, started by torchrun: loads the sparse student, trains it with
draftkit's ``train_sequences`` and ``fsdp`` on (the student sharded with FSDP2 over gloo) and writes what it saw: each rank the mask check on its own shards as training ended, rank 0 the gathered
weights and the report.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py STUDENT DATA.json CONFIG.json OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(student: str, data: str, config: str, out: str) -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from draftkit.distill import train as train_mod
    from draftkit.distill.config import DistillConfig
    from draftkit.sparsify.masks import target_linears

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    keep = {name: lin.weight.detach() != 0 for name, lin in target_linears(model).items()}

    shards: dict[str, torch.Tensor] = {}
    gather = train_mod.gather_full_model

    def spy(sharded):  # what this rank holds when training ends, before the weights are gathered
        for name, lin in target_linears(sharded).items():
            assert isinstance(lin.weight, DTensor), name
            shards[name] = lin.weight.to_local().detach().clone()
        return gather(sharded)

    train_mod.gather_full_model = spy
    encoded = json.loads(Path(data).read_text())
    trained, report = train_mod.train_sequences(model, encoded, 0, DistillConfig(**json.loads(Path(config).read_text())))

    check = {}
    for name, local in shards.items():
        mine = keep[name].chunk(world, dim=0)[rank]  # FSDP2 shards dim 0 as torch.chunk does
        assert local.shape == mine.shape, (name, local.shape, mine.shape)
        check[name] = {"rows": local.shape[0], "zeros_kept": int((local[~mine] == 0).sum()),
                       "zeros": int((~mine).sum())}
    out_dir = Path(out)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(check))
    if rank == 0:
        save_file({k: v.clone() for k, v in trained.state_dict().items()}, str(out_dir / "model.safetensors"))
        tied = trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
        (out_dir / "report.json").write_text(json.dumps({**report, "class": type(trained).__name__, "tied": tied}))
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
