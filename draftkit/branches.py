"""Which models a recipe stage reads: the stage before it by default, or stages named by reference (a
merge's ``models``).

A reference names an earlier stage of the same recipe by its index (``2``), its folder (``02-distill``)
or its stage name when only one earlier stage has it (``prune``); anything else is a model path, alias
or hub id. A stage's output folder is ``OUTPUT/NN-stage``.
"""

from __future__ import annotations

from pathlib import Path

from draftkit.errors import InvalidInputError


def find_step(recipe, ref: str | int, before: int):
    """The earlier step (index < ``before``) that ``ref`` names, or None when ``ref`` names no stage.

    Raises:
        InvalidInputError: ``ref`` names the stage itself or a later one, or a stage name that several
            earlier stages share.
    """
    text = str(ref).strip()
    by_index = [s for s in recipe.steps if text in (str(s.index), s.dirname)]
    by_name = [s for s in recipe.steps if s.name == text and s.index < before]
    if by_index:
        step = by_index[0]
        if step.index >= before:
            raise InvalidInputError(f"stages[{before}]: {text!r} names stage {step.dirname}, which does not run "
                                    "before it: a stage reads only earlier stages")
        return step
    if len(by_name) > 1:
        names = ", ".join(s.dirname for s in by_name)
        raise InvalidInputError(f"stages[{before}]: {text!r} is ambiguous ({names}): name the stage by its "
                                f"index or folder, e.g. {by_name[-1].dirname}")
    return by_name[0] if by_name else None


def stage_models(recipe, step, out: str | Path) -> list[str]:
    """The models a ``reads="models"`` stage (merge) reads: earlier stages' output folders, or paths."""
    from draftkit.stages import stages

    models = []
    for ref in step.config.models:
        found = find_step(recipe, ref, step.index)
        if found is not None and stages()[found.name].save is not None:
            raise InvalidInputError(f"stages[{step.index}].{step.name}: {ref!r} names {found.dirname}, which writes "
                                    "no model: name a stage that makes one (prune, sparsify, distill, merge)")
        models.append(str(Path(out) / found.dirname) if found is not None else str(ref))
    return models


def input_identity(models: list[str]) -> str:
    """The content identity of several input models, in order."""
    from draftkit.fingerprint import model_identity

    return " + ".join(model_identity(m) for m in models)
