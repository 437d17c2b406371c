"""Which models a recipe stage reads, so a recipe can branch: several stages start from one stage's output
(``from:``) and a ``merge`` names the stages it merges (``models:``).

A reference names an earlier stage of the same recipe by its ``name:`` label, its index (``2``), its folder
(``02-distill``) or its stage name when only one earlier stage has it (``prune``). A ``merge`` may also name
model paths, aliases or hub ids. A stage without ``from:`` reads the output of the last model-making stage
before it (the recipe's model for the first), as a recipe without branches always has.
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
    exact = [s for s in recipe.steps if text in (str(s.index), s.dirname) or (s.label is not None and text == s.label)]
    by_name = [s for s in recipe.steps if s.name == text and s.index < before]
    if exact:
        step = exact[0]
        if step.index >= before:
            raise InvalidInputError(f"stages[{before}]: {text!r} names stage {step.dirname}, which does not run "
                                    "before it: a stage reads only earlier stages")
        return step
    if len(by_name) > 1:
        names = ", ".join(s.dirname for s in by_name)
        raise InvalidInputError(f"stages[{before}]: {text!r} is ambiguous ({names}): name the stage by its "
                                f"index or folder, e.g. {by_name[-1].dirname}, or give it a name:")
    return by_name[0] if by_name else None


def _model_step(recipe, ref, step, what: str):
    from draftkit.stages import stages

    found = find_step(recipe, ref, step.index)
    if found is not None and not stages()[found.name].makes_model:
        raise InvalidInputError(f"stages[{step.index}].{step.name}: {what} {ref!r} names {found.dirname}, which "
                                "writes no model: name a stage that makes one (prune, sparsify, distill, merge)")
    return found


def source_step(recipe, step):
    """The step a ``from:`` names (None without ``from:``)."""
    if step.source is None:
        return None
    found = _model_step(recipe, step.source, step, "from:")
    if found is None:
        raise InvalidInputError(f"stages[{step.index}].{step.name}: from: {step.source!r} names no earlier stage; "
                                "stages: " + ", ".join(s.dirname + (f" ({s.label})" if s.label else "")
                                                       for s in recipe.steps[: step.index]))
    return found


def stage_models(recipe, step, out: str | Path) -> list[str]:
    """The models a ``reads="models"`` stage (merge) reads: earlier stages' output folders, or paths."""
    models = []
    for ref in step.config.models:
        found = _model_step(recipe, ref, step, "models:")
        models.append(str(Path(out) / found.dirname) if found is not None else str(ref))
    return models


def model_steps(recipe, step) -> list:
    """The earlier steps whose outputs ``step`` reads by reference (``from:`` or a merge's ``models:``)."""
    from draftkit.stages import stages

    if stages()[step.name].reads == "models":
        return [s for s in (_model_step(recipe, ref, step, "models:") for ref in step.config.models) if s is not None]
    src = source_step(recipe, step)
    return [src] if src is not None else []


def step_inputs(recipe, step, out: str | Path, current: str) -> tuple[list[str], list]:
    """``(models, steps)``: the models ``step`` reads (a merge's models, the ``from:`` stage's output, or
    ``current``, the last model made before it) and the earlier steps it names by reference."""
    from draftkit.stages import stages

    if stages()[step.name].reads == "models":
        return stage_models(recipe, step, out), model_steps(recipe, step)
    src = source_step(recipe, step)
    return ([str(Path(out) / src.dirname)], [src]) if src is not None else ([current], [])


def check_branches(recipe) -> None:
    """Labels are unique and every ``from:`` names an earlier model-making stage (references in a merge's
    ``models:`` may be paths: preflight checks those exist).

    Raises:
        InvalidInputError: one line naming the stage and the reference.
    """
    from draftkit.stages import stages

    seen: dict[str, int] = {}
    for step in recipe.steps:
        if step.label is not None:
            clash = [s for s in recipe.steps if step.label in (str(s.index), s.dirname)]
            if step.label in seen or clash:
                raise InvalidInputError(f"stages[{step.index}]: name {step.label!r} is already taken by stage "
                                        f"{seen.get(step.label, clash[0].index if clash else step.index)}: names must be unique")
            seen[step.label] = step.index
        if step.source is not None and stages()[step.name].reads == "models":
            raise InvalidInputError(f"stages[{step.index}].merge: a merge names its inputs in models:, not from:")
        source_step(recipe, step)


def input_identity(models: list[str]) -> str:
    """The content identity of several input models, in order."""
    from draftkit.fingerprint import model_identity

    return " + ".join(model_identity(m) for m in models)
