"""``draftkit distill``: self-data distillation (regenerate the SFT set with the teacher, then fine-tune).

Three spellings::

    draftkit distill STUDENT --teacher T --dataset D -o OUT     (both steps; same as `distill run`)
    draftkit distill regenerate --teacher T --dataset D -o ROWS_DIR
    draftkit distill train STUDENT --dataset ROWS_DIR -o OUT
"""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperGroup

from draftkit import console
from draftkit.cli._common import OUTPUT, ModelArg, Output, build, default_output, emit, handle_errors
from draftkit.cli._options import LOAD_ONLY_STREAMED, Fields, config_options
from draftkit.distill.config import DistillConfig
from draftkit.distill.regenerate import REPORT_FILE, ROWS_FILE
from draftkit.errors import InvalidInputError
from draftkit.stages import LoadConfig


class _DefaultRun(TyperGroup):
    """A group whose default command is ``run``: ``distill STUDENT ...`` means ``distill run STUDENT ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter) -> None:
        """The group's help, then the options of its default form ``distill STUDENT ...`` (= ``distill run``)."""
        super().format_help(ctx, formatter)
        run = self.commands["run"]
        sub = run.make_context("run", [], parent=ctx, resilient_parsing=True)
        rows = [r for p in run.get_params(sub) if (r := p.get_help_record(sub)) is not None]
        with formatter.section("Options of `draftkit distill STUDENT ...` (the same as `distill run`)"):
            formatter.write_dl(rows)


app = typer.Typer(
    cls=_DefaultRun,
    name="distill",
    help="Self-data distillation: the teacher rewrites the SFT set, then the student is fine-tuned on it "
    "with its sparsity masks held fixed. `draftkit distill STUDENT --teacher T --dataset D -o OUT` runs both steps.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

# ---- options: DistillConfig's fields (and LoadConfig's), generated --------------------------
SHORT = {"dataset": "-d", "teacher": "-t"}
GENERATION = ("teacher", "template", "max_new_tokens", "temperature", "top_p", "batch_size", "engine",
              "tensor_parallel", "max_model_len", "gpu_memory_utilization", "accept_filter")
# the teacher's own load settings when `distill run` loads it beside the student (`distill regenerate`
# loads only the teacher, with --dtype/--device/--trust-remote-code)
TEACHER_LOAD = ("teacher_dtype", "teacher_device", "teacher_trust_remote_code")
REGENERATION = (*GENERATION, *TEACHER_LOAD)
DATA = ("dataset", "split", "columns", "limit")


def _rows_source(dataset: str | None) -> str | None:
    """A directory written by `distill regenerate` stands for its rows.jsonl."""
    if dataset and Path(dataset).is_dir() and (Path(dataset) / ROWS_FILE).is_file():
        return str(Path(dataset) / ROWS_FILE)
    return dataset


@app.command("run")
@handle_errors
@config_options(cfg=Fields(DistillConfig, short=SHORT), load=Fields(LoadConfig, exclude=LOAD_ONLY_STREAMED), io=OUTPUT)
def run(student: ModelArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Regenerate the SFT set with the teacher, then fine-tune the student on it (masks held fixed).

    The regenerated rows go to WORK_DIR/data/rows.jsonl (default WORK_DIR: OUT-work) and are kept for
    inspection; re-running the same command resumes regeneration and training.

    Examples:

      draftkit distill llama-3.1-8b-prune6 --teacher llama-3.1-8b-instruct --dataset alpaca.jsonl -o healed

      draftkit distill pruned/ --teacher examples/tiny/teacher --dataset examples/tiny/data/train.jsonl
      --limit 2000 --template instruction-only --lr 1e-3 -o recovered

      draftkit distill pruned/ --dataset train.jsonl --no-regenerate -o sft-baseline   (plain SFT)
    """
    _distill(student, io, cfg=cfg, load=load)


@app.command("train")
@handle_errors
@config_options(cfg=Fields(DistillConfig, exclude=("regenerate", *REGENERATION), short=SHORT), load=Fields(LoadConfig, exclude=LOAD_ONLY_STREAMED), io=OUTPUT)
def train(student: ModelArg, *, cfg: dict, load: dict, io: Output) -> None:
    """Fine-tune the student on a dataset as is: the rows written by `distill regenerate` (pass its
    folder or rows.jsonl), or any SFT data (the plain SFT baseline). Sparsity masks are held fixed.

    Examples:

      draftkit distill train pruned/ --dataset rows/ -o recovered

      accelerate launch -m draftkit distill train pruned/ --dataset rows/ -o recovered   (several GPUs)
    """
    _distill(student, io, cfg={**cfg, "regenerate": False}, load=load)


def _distill(student: str, io: Output, *, cfg: dict, load: dict) -> None:
    """What `distill run` and `distill train` share: build the config, run the stage, print the report."""
    from draftkit.stages import run_stage

    console.set_quiet(io.quiet)
    out = io.output or default_output(student, "distill")
    work = cfg.pop("work_dir") or out.with_name(out.name + "-work")
    if cfg.get("regenerate") and load["trust_remote_code"]:  # --trust-remote-code covers the teacher too
        cfg["teacher_trust_remote_code"] = True
    config = build(DistillConfig, **{**cfg, "dataset": _rows_source(cfg["dataset"]), "work_dir": str(work)})
    report = run_stage("distill", student, config, out=out, load=build(LoadConfig, **load), overwrite=io.overwrite)
    emit(report, io.as_json, _render)


@app.command("regenerate")
@handle_errors
@config_options(cfg=Fields(DistillConfig, include=(*DATA, *GENERATION, "seed"), short=SHORT), load=Fields(LoadConfig, exclude=LOAD_ONLY_STREAMED), io=OUTPUT)
def regenerate_cmd(*, cfg: dict, load: dict, io: Output) -> None:
    """Let the teacher rewrite each row's response; write OUT/rows.jsonl (with per-row provenance) and
    OUT/regenerate.json. Re-running with the same OUT resumes where it stopped.

    Examples:

      draftkit distill regenerate --teacher llama-3.1-70b-instruct --engine vllm --tensor-parallel 4
      --dataset gsm8k.jsonl -o gsm8k-distilled

      draftkit distill regenerate --teacher examples/tiny/teacher --dataset examples/tiny/data/train.jsonl
      --template instruction-only --limit 500 --max-new-tokens 96 -o rows
    """
    from draftkit.distill.regenerate import regenerate_into

    console.set_quiet(io.quiet)
    if cfg["teacher"] is None:
        raise InvalidInputError("--teacher is required: the model that rewrites the responses")
    settings = build(LoadConfig, **load)  # a bad --device or --dtype: exit 2 before anything is read
    config = build(DistillConfig, **cfg)
    out = io.output or Path(f"{Path(str(cfg['dataset'])).stem or 'dataset'}-regenerated")
    from draftkit.stages import stage_compute

    choice = stage_compute("regenerate", settings)  # the teacher only runs: it loads in the compute dtype
    from draftkit.memory import estimate_line

    with estimate_line():
        report = regenerate_into(config, out, overwrite=io.overwrite, device=settings.device,
                                 dtype=choice.name if choice else settings.dtype, trust_remote_code=settings.trust_remote_code)
    report["output"] = str(out)
    emit(report, io.as_json, _render_regenerate)


def _render_regenerate(report: dict) -> None:
    console.out.print(
        f"{report['rows']} rows in {report['rows_file']} ({report['generated_now']} generated now, "
        f"{report['resumed']} resumed); accepted {report['accepted']} ({100 * report['acceptance_rate']:.1f}%)"
    )
    if report.get("tokens_per_second"):
        console.out.print(f"{report['new_tokens']} new tokens in {report['generate_seconds']:.1f}s "
                          f"({report['tokens_per_second']:.1f} tokens/s)")
    for reason, n in sorted(report.get("rejected_reasons", {}).items(), key=lambda kv: -kv[1]):
        console.out.print(f"  kept the original response: {reason}: {n}")
    console.out.print(f"report: {Path(report['rows_file']).parent / REPORT_FILE}")


def _render(report: dict) -> None:
    if report.get("regenerate"):
        _render_regenerate(report["regenerate"])
    t = report["train"]
    evaluated = "" if t.get("eval_loss_before") is None else \
        f", eval loss {t['eval_loss_before']} -> {t['eval_loss_after']}"  # none without an eval split
    console.out.print(
        f"trained ({t['mode']}) {t['steps']} steps on {t['train_examples']} examples: "
        f"train loss {t['train_loss_first']} -> {t['train_loss_last']}{evaluated}"
    )
    if t["masked_modules"]:
        console.out.print(f"held {t['masked_zeros']} zeros in {t['masked_modules']} linears fixed "
                          f"({t['zero_positions_changed']} changed)")
    console.out.print(f"saved to {report['output']} in {report['total_seconds']:.1f}s")
