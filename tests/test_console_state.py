"""An in-process CLI call silences libraries process-wide (console.set_verbose(False): environment variables,
warning filters, logger levels); tests/conftest.py undoes it after each test, so the next test starts from the
state the previous one started with. The two tests run in this order: the first changes it, the second checks."""

from __future__ import annotations

import logging
import os
import warnings

from draftkit import console

ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
       "DATASETS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate")


def snapshot() -> dict:
    harmless = [f for f in warnings.filters if f[0] == "ignore" and f[1] is not None
                and f[1].pattern in console.HARMLESS_WARNINGS]
    return {"env": {n: os.environ.get(n) for n in ENV}, "harmless_filters": len(harmless),
            "levels": {n: logging.getLogger(n).level for n in LOGGERS}, "verbose": console.verbose()}


BEFORE: list[dict] = []


def test_1_a_cli_call_silences_the_libraries():
    BEFORE.append(snapshot())
    console.set_verbose(False)
    after = snapshot()
    assert after["levels"]["transformers"] == logging.ERROR and after["harmless_filters"] > 0 and after != BEFORE[0]


def test_2_the_next_test_starts_clean():
    assert BEFORE and snapshot() == BEFORE[0]
