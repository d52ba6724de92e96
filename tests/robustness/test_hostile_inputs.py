"""Every hostile input of hostile_inputs.py, through the `kaf` command as a user meets it: a one-line
message naming the bad file, the user-error exit code, nothing written, the inputs untouched."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import pytest
from hostile_inputs import (
    CASES,
    PICKLE_MARKER,
    HostileInput,
    make_finetuned,
    make_folders,
    pickle_checkpoint,
    run_kaf,
)

from kaf.app.cli import EXIT_USER_ERROR

MINIMUM_CASES = 35
TABLE = Path(__file__).resolve().parents[2] / "docs" / "ROBUSTNESS.md"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_finetuned(tmp_path_factory.mktemp("valid"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, hidden ones included, with a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_is_refused_with_one_clear_message_and_changes_nothing(
    case: HostileInput, finetuned: Path, tmp_path: Path
) -> None:
    folders = make_folders(tmp_path, finetuned)
    arguments = case.arguments(folders)
    before = snapshot(folders.inputs)

    outcome = run_kaf(arguments)

    message = outcome.stderr.strip()
    assert outcome.code == EXIT_USER_ERROR, message
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"kaf {case.command}: error: ")
    assert re.search(case.expected, message), message
    assert case.culprit in message
    assert outcome.stdout == ""
    assert list(folders.outputs.iterdir()) == []
    assert snapshot(folders.inputs) == before
    assert not (folders.inputs / PICKLE_MARKER).exists()


def test_the_pickle_payload_does_run_when_unpickled(tmp_path: Path) -> None:
    """So that the suite's check that it never ran means something."""
    folders = make_folders(tmp_path, finetuned=tmp_path / "unused.safetensors")

    pickle.loads(pickle_checkpoint(folders).read_bytes())["state_dict"].close()

    assert (folders.inputs / PICKLE_MARKER).exists()


def test_the_suite_covers_at_least_35_distinct_cases() -> None:
    assert len(CASES) >= MINIMUM_CASES
    assert len({case.name for case in CASES}) == len(CASES)
    assert len({case.what for case in CASES}) == len(CASES)


def test_the_robustness_table_lists_every_case_and_their_number() -> None:
    table = TABLE.read_text(encoding="utf-8")

    missing = [case.what for case in CASES if f"| {case.what} |" not in table]
    assert missing == []
    assert f"{len(CASES)} hostile inputs" in table
