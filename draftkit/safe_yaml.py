"""YAML from untrusted files: ``yaml.safe_load``'s types, without the ways a small file can hurt.

:func:`load_yaml` builds the same data as ``yaml.safe_load`` (no Python tags, no code) and refuses, with
one line naming the place:

* a file larger than :data:`MAX_BYTES` (a recipe is a few hundred bytes of text);
* nesting deeper than :data:`MAX_DEPTH` (libyaml's composer recurses on the C stack: a hundred thousand
  ``[`` crash the interpreter);
* a document that expands to more than :data:`MAX_VALUES` values through anchors and aliases (the "billion
  laughs" bomb: nine levels of nine aliases are a few hundred bytes and 387 million values once every later
  step walks them); anchors and aliases that stay under the cap work as usual;
* a key that appears twice in one mapping (``safe_load`` keeps the last one without a word).
"""

from __future__ import annotations

from typing import Any

import yaml

from draftkit.errors import InvalidInputError

MAX_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_VALUES = 100_000

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present (C speed), same types
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


class YamlError(InvalidInputError):
    """A YAML file is malformed or hostile; the message names file, line and column."""


def _at(filename: str, mark) -> str:
    return f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark is not None else filename


def load_yaml(text: str, filename: str = "<yaml>", *, error: type[InvalidInputError] = YamlError) -> tuple[Any, yaml.Node | None]:
    """``(data, node)``: the document as ``yaml.safe_load`` builds it, and its composed node (for positions).

    Raises:
        error: too large, too deep, an alias bomb, a duplicate key or a syntax error (``file:line:col: ...``).
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise error(f"{filename}: {size:,} bytes is too large for a YAML file here (at most {MAX_BYTES:,}); "
                    "it should name models and data files, not hold them")
    try:
        _check_depth(text, filename, error)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _check_expansion(node, filename, error)
            _check_duplicates(node, filename, error)
            return loader.construct_document(node), node
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        raise error(f"{_at(filename, exc.problem_mark)}: YAML syntax error: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{filename}: YAML error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _check_depth(text: str, filename: str, error: type[InvalidInputError]) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the parser's events (the parser itself does not recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise error(f"{_at(filename, event.start_mark)}: nested more than {MAX_DEPTH} levels deep; "
                            "a recipe needs a handful")
        elif isinstance(event, _CLOSE):
            depth -= 1


def _check_expansion(root: yaml.Node, filename: str, error: type[InvalidInputError]) -> None:
    """Count the values the document holds once every alias is expanded (each shared node counted once per
    use, computed once per node), and refuse more than MAX_VALUES."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if sizes.get(key) == -1:  # reached again while its own size is being computed
            raise error(f"{_at(filename, node.start_mark)}: a YAML alias refers to the value that contains it; "
                        "a recursive value has no end: write it out")
        if key not in sizes:
            sizes[key] = -1
            if isinstance(node, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                total = 1 + sum(size(v) for v in node.value)
            else:
                total = 1
            sizes[key] = min(total, MAX_VALUES + 1)
        return sizes[key]

    if size(root) > MAX_VALUES:
        raise error(f"{filename}: the document expands to more than {MAX_VALUES:,} values through YAML anchors and "
                    "aliases (&name / *name): an alias bomb? write the values out, or use fewer aliases")


def _check_duplicates(root: yaml.Node, filename: str, error: type[InvalidInputError]) -> None:
    """A key written twice in one mapping: the first repetition, with both lines."""
    seen_nodes: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    ident = (k.tag, k.value)
                    if ident in first:
                        raise error(f"{_at(filename, k.start_mark)}: duplicate key {k.value!r} (first at line "
                                    f"{first[ident].start_mark.line + 1}): a key may appear once in a mapping; "
                                    "keep one of them")
                    first[ident] = k
                todo.extend((k, v))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)


def unshared(data: Any, what: str, *, error: type[InvalidInputError] = YamlError) -> Any:
    """A copy of ``data`` (dicts, lists, scalars) in which no dict or list appears twice, refused once it
    would hold more than MAX_VALUES values: references such as a recipe's ``${...}`` share what they name,
    and a value that names another nine times a level is a bomb of its own."""
    budget = MAX_VALUES

    def copy(value: Any) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise error(f"{what}: expands to more than {MAX_VALUES:,} values through references: write the values out")
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return copy(data)
