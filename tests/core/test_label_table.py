"""Class names beside a segmentation: the CSV colour table (3D Slicer's format) written, read and refused."""

import csv

import pytest

from kaf.app.cli import EXIT_USER_ERROR, main
from kaf.app.workflow import checked_label_names
from kaf.data.volume_io.label_table import (
    COLUMNS,
    PALETTE,
    label_color,
    label_table_path,
    read_label_table,
    write_label_table,
)
from kaf.models.checkpoints import load_checkpoint
from kaf.runtime.errors import InputDataError, InputFileError

FAST = ["--steps", "2", "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--progress", "none"]


def test_write_and_read_round_trip(tmp_path):
    names = ["background", "left ventricle", "myocardium, outer", "RV"]
    path = write_label_table(tmp_path / "seg.csv", names)
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == list(COLUMNS)
    assert rows[1] == ["1", "left ventricle", *map(str, PALETTE[0]), "255"]  # background left out
    assert rows[2][1] == "myocardium, outer" and len(rows) == 4  # a comma is quoted, not a new column
    table = read_label_table(path)
    assert table.label_names() == names
    assert table.colors == {value: (*label_color(value), 255) for value in (1, 2, 3)}
    assert not list(tmp_path.glob(".*partial*"))  # written atomically: no temporary left behind


def test_palette_repeats_and_missing_values_are_numbered(tmp_path):
    assert label_color(1) == PALETTE[0] and label_color(len(PALETTE) + 1) == PALETTE[0]
    assert len(set(PALETTE)) == len(PALETTE)
    path = tmp_path / "t.csv"
    path.write_text("LabelValue,Name,Color_R,Color_G,Color_B,Color_A\n3,tumour,1,2,3,255\n")
    assert read_label_table(path).label_names() == ["background", "label 1", "label 2", "tumour"]


@pytest.mark.parametrize(
    ("segmentation", "table"),
    [("a/seg.nii.gz", "a/seg.csv"), ("seg.nii", "seg.csv"), ("s.nrrd", "s.csv"), ("s.seg.nrrd", "s.csv")],
)
def test_table_path_beside_the_segmentation(tmp_path, segmentation, table):
    assert label_table_path(tmp_path / segmentation) == tmp_path / table


def test_a_missing_table_is_none(tmp_path):
    assert read_label_table(tmp_path / "none.csv") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Value,Name\n1,a\n", "lacks the column(s) LabelValue, Color_R"),
        ("LabelValue,Name,Color_R,Color_G,Color_B,Color_A\none,a,1,2,3,255\n", "line 2: LabelValue is 'one'"),
        ("LabelValue,Name,Color_R,Color_G,Color_B,Color_A\n1,a,1,2,300,255\n", "Color_B is '300'"),
        (
            "LabelValue,Name,Color_R,Color_G,Color_B\n1,a,1,2,3\n1,b,1,2,3\n",
            "line 3: label value 1 is listed twice",
        ),
        ("LabelValue,Name,Color_R,Color_G,Color_B,Color_A\n-2,a,1,2,3,255\n", "not a whole number 0 or more"),
    ],
)
def test_a_malformed_table_names_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputFileError) as raised:
        read_label_table(path)
    assert str(path) in str(raised.value) and problem in str(raised.value)


def test_names_a_table_cannot_hold_are_refused_where_they_enter(tmp_path):
    with pytest.raises(InputDataError, match="'the \"big\" one' contains a double quote"):
        checked_label_names(["background", 'the "big" one'], 2)
    with pytest.raises(InputDataError, match="contains a line break"):
        write_label_table(tmp_path / "t.csv", ["background", "a\nb"])
    assert not (tmp_path / "t.csv").exists()


def test_predict_writes_the_names_of_the_checkpoint_beside_its_segmentation(
    synthetic_files, tmp_path, capsys
):
    image, sparse, _ = synthetic_files
    model = tmp_path / "m.safetensors"
    common = ["--image", str(image), "--labels", str(sparse), "--out", str(model), *FAST]
    assert main(["finetune", *common, "--label-names", 'background,ring,"disc"']) == EXIT_USER_ERROR
    assert "double quote" in capsys.readouterr().err
    assert main(["finetune", *common, "--label-names", "background, ring ,disc"]) == 0
    assert load_checkpoint(model)[1].label_names == ["background", "ring", "disc"]

    segmentation = tmp_path / "seg.nii.gz"
    predict = ["predict", "--image", str(image), "--checkpoint", str(model), "--out", str(segmentation)]
    (tmp_path / "seg.csv").write_text("mine")
    assert main([*predict, "--device", "cpu", "--progress", "none"]) == EXIT_USER_ERROR  # never overwritten
    assert "seg.csv: already exists" in capsys.readouterr().err and not segmentation.exists()
    assert main([*predict, "--device", "cpu", "--progress", "none", "--force"]) == 0
    assert read_label_table(tmp_path / "seg.csv").label_names() == ["background", "ring", "disc"]
    assert f"label_table: {tmp_path / 'seg.csv'}" in capsys.readouterr().out
