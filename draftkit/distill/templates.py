"""The teacher's prompt, final-answer extraction and the acceptance filter of self-data distillation.

Self-data distillation (Thangarasa et al. 2024, after Yang et al. 2024's SDFT) shows the teacher the
instruction together with the dataset's reference response and asks it to answer in its own words; the
rewritten response stays in the teacher's own distribution, which is what a pruned copy of the teacher
(or a draft aligned to it, SD², Lasby et al. 2025) recovers best from. A rewrite is kept only when it
reaches the same final answer and does not talk about the reference; otherwise the row keeps the original.
"""

from __future__ import annotations

import hashlib
import re

DEFAULT_TEMPLATE = (
    "{instruction}\n\n"
    "Here is a reference answer to the request above:\n"
    "{reference}\n\n"
    "Refer to the reference answer and write your own response to the request in your own words. "
    "Keep the same final answer. Reply with the response only and do not mention the reference answer."
)

# A template that shows the teacher only the instruction: plain self-distillation (the teacher's own
# answer, still filtered by the final answer). Useful for small teachers that cannot follow the default.
INSTRUCTION_ONLY_TEMPLATE = "{instruction}"

FIELDS = ("instruction", "reference")

# Phrases that betray a response written *about* the reference rather than *as* the answer.
META_PHRASES = (
    "reference answer",
    "reference response",
    "reference solution",
    "the reference",
    "provided answer",
    "provided response",
    "given answer",
    "given response",
    "your response",
    "the above response",
    "own words",
    "as an ai",
)

_HASH_RE = re.compile(r"####\s*([^\n]+)")
_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def check_template(template: str) -> None:
    """Raise ValueError unless the template holds ``{instruction}``."""
    if "{instruction}" not in template:
        raise ValueError("the template must contain {instruction} (and usually {reference})")


def fill_template(template: str, instruction: str, reference: str) -> str:
    """Replace ``{instruction}`` and ``{reference}`` literally (other braces, e.g. ``\\boxed{}``, stay)."""
    return template.replace("{instruction}", instruction).replace("{reference}", reference)


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def has_final_answer_marker(text: str) -> bool:
    return bool(_HASH_RE.search(text)) or "\\boxed{" in text


def extract_answer(text: str | None) -> str | None:
    """The final answer after the last ``####`` or in the last ``\\boxed{}``, normalised; None if absent.

    Numbers are normalised (commas, ``$``, trailing ``.0`` and a final period dropped), so ``#### 1,200.0``
    and ``\\boxed{1200}`` give the same answer; other answers are compared as stripped text.
    """
    if not text:
        return None
    matches = _HASH_RE.findall(text)
    raw = matches[-1] if matches else _boxed(text)
    if raw is None:
        return None
    return normalise_answer(raw)


def normalise_answer(raw: str) -> str | None:
    s = raw.strip().replace("$", "").replace("\\!", "").strip()
    s = s.removesuffix(".").strip()
    if not s:
        return None
    compact = s.replace(",", "").replace(" ", "")
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", compact):
        value = float(compact)
        return str(int(value)) if value == int(value) else repr(value)
    # "42 apples" -> "42"; otherwise keep the text.
    number = _NUMBER_RE.match(s)
    if number and not re.search(r"[=+*/^]", s[number.end():]):
        return normalise_answer(number.group(0))
    return " ".join(s.split()).lower()


def meta_phrase(text: str) -> str | None:
    """The first phrase of :data:`META_PHRASES` found in ``text`` (case-insensitive), else None."""
    low = text.lower()
    for phrase in META_PHRASES:
        if phrase in low:
            return phrase
    return None


def accept(response: str, reference: str, *, finished: bool = True) -> tuple[bool, str]:
    """Whether to keep the teacher's ``response`` for a row whose original response is ``reference``.

    Returns ``(accepted, reason)``; the reason is recorded per row in the distilled set.
    """
    if not response.strip():
        return False, "empty response"
    if not finished:
        return False, "truncated at max_new_tokens"
    phrase = meta_phrase(response)
    if phrase is not None:
        return False, f"mentions the reference ({phrase!r})"
    if has_final_answer_marker(reference):
        want = extract_answer(reference)
        got = extract_answer(response)
        if got is None:
            return False, "no final answer"
        if got != want:
            return False, f"final answer {got} != {want}"
        return True, "final answer matches"
    return True, "accepted (no final answer to check)"


def resolve_template(value):
    """``"default"`` / ``"instruction-only"`` -> the shipped templates; an existing file path (with no
    ``{``) -> its text; anything else is returned as is."""
    if not isinstance(value, str):
        return value
    if value == "default":
        return DEFAULT_TEMPLATE
    if value == "instruction-only":
        return INSTRUCTION_ONLY_TEMPLATE
    from pathlib import Path

    if "{" not in value and "\n" not in value and len(value) < 4096 and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    return value
