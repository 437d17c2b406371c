"""Units of the distill stage: answer extraction, the acceptance filter, templates, column mapping."""

import pytest

from draftkit.distill import DistillConfig, load_examples, parse_columns
from draftkit.distill.regenerate import teacher_prompt_ids
from draftkit.distill.templates import (
    DEFAULT_TEMPLATE,
    accept,
    extract_answer,
    fill_template,
    meta_phrase,
    template_hash,
)
from draftkit.errors import DataError
from tests._helpers_distill import no_template_model, one_thread, write_jsonl

FIXTURES = (no_template_model, one_thread)  # pytest finds fixtures by name in this module
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("so 3 + 4 = 7.\n#### 7", "7"),
        ("#### 1,200", "1200"),
        ("#### 42.0", "42"),
        ("#### -3", "-3"),
        ("#### 2.5", "2.5"),
        ("#### $18.", "18"),
        ("first #### 3 then\n#### 5", "5"),
        ("The answer is \\boxed{12}.", "12"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("#### 42 apples", "42"),
        ("no marker 42", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_accept_rules():
    ref = "3 + 4 = 7.\n#### 7"
    assert accept("Adding gives 7.\n#### 7", ref) == (True, "final answer matches")
    assert accept("\\boxed{7}", ref)[0]  # another marker, same answer
    ok, why = accept("It is 8.\n#### 8", ref)
    assert not ok and why == "final answer 8 != 7"
    assert accept("It is seven.", ref) == (False, "no final answer")
    assert accept("   ", ref) == (False, "empty response")
    assert accept("#### 7", ref, finished=False) == (False, "truncated at max_new_tokens")
    ok, why = accept("As the reference answer says, 3 + 4 = 7.\n#### 7", ref)
    assert not ok and "reference answer" in why
    ok, why = accept("Here is my rewrite of your response: 7\n#### 7", ref)
    assert not ok and "your response" in why
    # a reference without a final-answer marker: only the meta-phrase filter applies
    assert accept("Paris is the capital.", "The capital is Paris.") == (True, "accepted (no final answer to check)")


def test_meta_phrase_is_case_insensitive():
    assert meta_phrase("In My Own Words: x") == "own words"
    assert meta_phrase("The sum is 7.") is None


def test_template_fill_keeps_other_braces():
    t = "Q: {instruction}\nRef: {reference}\nPut it in \\boxed{}."
    assert fill_template(t, "a {b}", "c") == "Q: a {b}\nRef: c\nPut it in \\boxed{}."
    assert template_hash(t) != template_hash(DEFAULT_TEMPLATE)
    with pytest.raises(ValueError, match="instruction"):
        DistillConfig(dataset="x.jsonl", teacher="t", template="no placeholder")


def test_parse_columns():
    assert parse_columns("prompt=q,response=a") == {"prompt": "q", "response": "a"}
    assert parse_columns("prompt=instruction,input,response=output") == {"prompt": "instruction,input", "response": "output"}
    assert parse_columns("messages=conv") == {"messages": "conv"}
    for bad in ("prompt=q", "foo=bar,response=a", "q,a"):
        with pytest.raises(ValueError, match="--columns"):
            parse_columns(bad)


@pytest.mark.parametrize(
    ("row", "instruction", "reference"),
    [
        ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "Add 2 and 3.", "5"),  # Alpaca
        ({"instruction": "Summarise.", "input": "Long text", "output": "Short"}, "Summarise.\n\nLong text", "Short"),
        ({"instruction": "Who?", "context": "Ann wrote it.", "response": "Ann"}, "Who?\n\nAnn wrote it.", "Ann"),  # Dolly
        ({"question": "2+2?", "answer": "4\n#### 4"}, "2+2?", "4\n#### 4"),  # GSM8K
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]}, "Hi", "Hello"),
    ],
)
def test_load_examples_shapes(tmp_path, row, instruction, reference):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,) = load_examples(DistillConfig(dataset=str(path), regenerate=False))
    assert ex.instruction == instruction and ex.reference == reference
    if "messages" in row:
        assert ex.prompt[0] == {"role": "system", "content": "Be brief."}


def test_load_examples_columns_override_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "1+1?", "a": ""}])
    with pytest.raises(DataError) as err:
        load_examples(DistillConfig(dataset=str(path), regenerate=False))
    assert "['a', 'q']" in str(err.value) and "--columns prompt=COL" in str(err.value)
    examples = load_examples(DistillConfig(dataset=str(path), regenerate=False, columns="prompt=q,response=a"))
    assert [e.reference for e in examples] == ["4"]  # the empty response is skipped
    with pytest.raises(DataError, match=r"columns \['z'\] not in the data"):
        load_examples(DistillConfig(dataset=str(path), regenerate=False, columns="prompt=z,response=a"))
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match="prompt and response columns"):
        load_examples(DistillConfig(dataset=str(text), regenerate=False))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_examples(DistillConfig(dataset=str(empty), regenerate=False))


def test_teacher_prompt_uses_chat_template_or_plain_fallback(tiny_llama, no_template_model):
    from transformers import AutoTokenizer

    from draftkit.distill.regenerate import Example

    e = Example(0, "0-x", [{"role": "user", "content": "2+2?"}], "4\n#### 4")
    chat = AutoTokenizer.from_pretrained(tiny_llama)
    text = chat.decode(teacher_prompt_ids(chat, e, "{instruction} | {reference}"))
    assert text == "<|user|>\n2+2? | 4\n#### 4</s>\n<|assistant|>\n"
    plain = AutoTokenizer.from_pretrained(no_template_model)
    assert not plain.chat_template
    text = plain.decode(teacher_prompt_ids(plain, e, "{instruction}"))
    assert text.endswith("User: 2+2?\n\nAssistant: ")


def test_stage_is_registered_with_a_strict_config():
    from pydantic import ValidationError

    from draftkit.stages import stages

    stage = stages()["distill"]
    assert stage.config is DistillConfig and stage.check is not None
    with pytest.raises(ValidationError, match="extra"):
        DistillConfig(dataset="d.jsonl", teacher="t", learning_rate=1.0)
    with pytest.raises(ValidationError, match="teacher is required"):
        DistillConfig(dataset="d.jsonl")
    assert DistillConfig(dataset="d.jsonl", regenerate=False).teacher is None  # plain SFT needs no teacher
