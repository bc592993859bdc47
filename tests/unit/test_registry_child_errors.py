"""What crosses the registry child's process boundary: errors keep their class, message and file, and
a child that dies without an answer is ModelUnavailable (the real child runs in
tests/integration/test_registry_process.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_app.errors import BundleIntegrityError, ModelUnavailable, RecserveError
from serve_app.registry_process import RegistryProcess, error_from_record, error_record


@pytest.mark.parametrize(
    "error",
    [
        BundleIntegrityError(
            "checksum mismatch (manifest 0a1b..., file 2c3d...)", file="ranker.ubj"
        ),
        BundleIntegrityError("bundle directory /x does not exist"),
        ModelUnavailable("model 'recserve' has no alias 'gold' (aliases: champion)"),
    ],
)
def test_an_error_comes_back_as_the_same_class_message_and_file(error: RecserveError) -> None:
    back = error_from_record(error_record(error))
    assert type(back) is type(error)
    assert back.message == error.message
    assert getattr(back, "file", None) == getattr(error, "file", None)


def test_an_error_of_another_kind_is_model_unavailable() -> None:
    back = error_from_record({"kind": "KeyError", "message": "'version'"})
    assert type(back) is ModelUnavailable and back.message == "'version'"


def test_a_child_that_exits_without_an_answer_is_model_unavailable() -> None:
    false = shutil.which("false")
    assert false is not None
    with pytest.raises(ModelUnavailable, match=r"registry fetch of 'm' failed \(exit 1\)"):
        RegistryProcess(python=false).fetch("sqlite:///unused.db", "m", "1", Path("/unused"))
