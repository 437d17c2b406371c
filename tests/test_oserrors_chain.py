"""Only the machine refusing an operation is a user error (exit 2): a bug raised while handling an unrelated
OS error, or whose text happens to hold the OS's words, stays an internal error (exit 1)."""

from __future__ import annotations

import errno

from typer.testing import CliRunner

from draftkit.cli import app
from draftkit.oserrors import user_error


def _bug_while_handling(os_error: OSError) -> KeyError:
    try:
        try:
            raise os_error
        except PermissionError:
            raise KeyError("a bug in the handler")  # noqa: B904 - the point: not raised from it
    except KeyError as bug:
        return bug


def test_a_bug_raised_while_handling_an_os_error_is_no_user_error():
    bug = _bug_while_handling(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert isinstance(bug.__context__, PermissionError) and bug.__cause__ is None
    assert user_error(bug) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/full/x")
        except OSError as full:
            raise RuntimeError("could not save") from full
    except RuntimeError as wrapped:
        assert "no space left" in str(user_error(wrapped))  # raised *from* it: still the machine


def test_the_os_words_count_only_in_library_errors():
    assert user_error(ValueError("File too large: shape [1, 2] for this table")) is None
    assert user_error(KeyError("Too many open files")) is None
    assert "file too large" in str(user_error(RuntimeError("File too large")))


def test_a_bug_in_a_handler_of_a_permission_error_exits_1(tiny_llama, tmp_path, monkeypatch):
    import draftkit.cli.merge

    def buggy(*args, **kwargs):
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")
        except PermissionError:
            return {}["missing key"]

    monkeypatch.setattr(draftkit.cli.merge, "merge_checkpoints", buggy)
    result = CliRunner().invoke(app, ["merge", str(tiny_llama), str(tiny_llama), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "permission denied" not in result.output, result.output
