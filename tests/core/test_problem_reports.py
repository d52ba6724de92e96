"""Long lists of problems are summarised: the message counts them and names the first few, and a log file,
whose path the message gives, lists them all."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from kaf.app.cli import EXIT_USER_ERROR, main
from kaf.runtime.problems import SHOWN, summarise

JUNK_FILES = 1000


@pytest.fixture
def temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system's temporary folder, for this test alone."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def logged(message: str) -> Path:
    return Path(re.search(r"are listed in (\S+\.log)\)", message).group(1))


def test_a_few_problems_are_all_named_and_need_no_log(temporary_folder: Path) -> None:
    problems = [f"scan{i}.nii.gz: damaged" for i in range(SHOWN)]

    assert summarise(problems, "test") == "; ".join(problems)
    assert list(temporary_folder.iterdir()) == []


def test_many_problems_name_the_first_few_and_log_them_all_beside_the_output(
    tmp_path: Path, temporary_folder: Path
) -> None:
    problems = [f"scan{i}.nii.gz: damaged" for i in range(12)]

    message = summarise(problems, "test", log_folder=tmp_path)

    assert message.startswith("; ".join(problems[:SHOWN]) + "; and 7 more (all 12 are listed in ")
    assert "scan5.nii.gz" not in message
    assert logged(message).parent == tmp_path
    assert logged(message).read_text().splitlines() == problems


def test_a_log_that_cannot_be_written_still_leaves_a_short_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))

    message = summarise([f"scan{i}.nii.gz: damaged" for i in range(12)], "test")

    assert message.startswith("scan0.nii.gz: damaged; ")
    assert "and 7 more (the full list of 12 could not be written: " in message


def test_pretraining_on_a_thousand_unreadable_files_gives_a_short_message_and_a_full_log(
    tmp_path: Path, temporary_folder: Path, capsys
) -> None:
    data, outputs = tmp_path / "data", tmp_path / "outputs"
    data.mkdir()
    outputs.mkdir()
    junk = [data / f"scan{i:04d}.nii.gz" for i in range(JUNK_FILES)]
    for path in junk:
        path.write_bytes(b"not a volume")
    out = outputs / "pretrained.safetensors"
    arguments = ["--method", "gcl", "--data", str(data), "--out", str(out), "--device", "cpu"]

    assert main(["pretrain", *arguments, "--progress", "none"]) == EXIT_USER_ERROR

    stderr = capsys.readouterr().err
    assert len(stderr.encode()) < 2000, stderr
    [message] = [line for line in stderr.splitlines() if line.startswith("kaf pretrain: error: ")]
    assert f"no usable volume for pretraining among {data}; {JUNK_FILES} left out: " in message
    assert f"all {JUNK_FILES} are listed in" in message
    log = logged(message)
    assert log.parent == temporary_folder  # a failed command leaves its output folder as it was
    assert list(outputs.iterdir()) == []
    lines = log.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [str(path) for path in junk]
