"""Reader, writers, sample data and manifest, through napari's plugin machinery (no canvas needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")

from kaf.data.volume_io import Volume, read_volume, write_volume
from napari_kaf._io import get_reader, read_volumes
from napari_kaf._marshal import affine_of, layer_kwargs
from napari_kaf._sample_data import synthetic_sample

OBLIQUE = np.array(
    [
        [-1.5, 0.1, 0.0, 90.0],
        [0.0, 1.2, 0.2, -120.0],
        [0.0, 0.0, 4.0, -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _image(shape=(6, 20, 24)) -> np.ndarray:
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def test_manifest_is_registered(plugins):
    manifest = plugins.get_manifest("napari-kaf")
    assert manifest.display_name == "KAF Segment"
    assert [w.display_name for w in manifest.contributions.widgets] == ["KAF Segment"]
    assert {s.key for s in manifest.contributions.sample_data} == {"mni152", "synthetic"}
    patterns = manifest.contributions.readers[0].filename_patterns
    assert {"*.nii", "*.nii.gz", "*.nrrd"} <= set(patterns)


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(npe2), "validate", "napari-kaf", "--imports"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_reader_declines_other_files(tmp_path):
    assert get_reader(str(tmp_path / "picture.png")) is None
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.tif")]) is None
    assert get_reader(str(tmp_path / "scan.nii.gz")) is read_volumes


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_open_and_save_keep_spacing_and_affine(plugins, tmp_path, suffix):
    from napari.components import ViewerModel

    image = _image()
    path = write_volume(image, OBLIQUE, tmp_path / f"scan{suffix}")
    viewer = ViewerModel()
    [layer] = viewer.open(str(path), plugin="napari-kaf")
    assert layer._type_string == "image"
    assert layer.name == "scan"
    expected_spacing = read_volume(path).spacing
    np.testing.assert_allclose(layer.scale, expected_spacing)
    np.testing.assert_allclose(layer.metadata["affine"], OBLIQUE, atol=1e-4)
    np.testing.assert_array_equal(layer.data, image)

    labels = (image > 0.5).astype(np.uint8) + (image > 1.5)
    labels_layer = viewer.add_labels(labels, name="labels", metadata=dict(layer.metadata), scale=layer.scale)
    written = labels_layer.save(str(tmp_path / f"labels{suffix}"), plugin="napari-kaf")
    assert written == [str(tmp_path / f"labels{suffix}")]
    back = read_volume(written[0])
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, OBLIQUE, atol=1e-4)
    [reopened] = viewer.open(written[0], plugin="napari-kaf")
    assert reopened._type_string == "labels"  # an integer file whose name says "labels"

    written = layer.save(str(tmp_path / f"copy{suffix}"), plugin="napari-kaf")
    np.testing.assert_allclose(read_volume(written[0]).affine, OBLIQUE, atol=1e-4)


def test_writer_without_affine_uses_scale_and_translate(plugins, tmp_path):
    from napari.layers import Labels

    layer = Labels(np.ones((3, 4, 5), dtype=np.uint8), scale=(3.0, 2.0, 1.0), translate=(10.0, 20.0, 30.0))
    [written] = layer.save(str(tmp_path / "plain.nii.gz"), plugin="napari-kaf")
    affine = nib.load(written).affine
    np.testing.assert_allclose(np.diag(affine)[:3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(affine[:3, 3], [30.0, 20.0, 10.0])
    assert np.allclose(affine_of(None, (3.0, 2.0, 1.0), (10.0, 20.0, 30.0)), affine)


def test_unreadable_file_is_one_notification(plugins, tmp_path, monkeypatch):
    from napari.components import ViewerModel

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    viewer = ViewerModel()
    assert viewer.open(str(broken), plugin="napari-kaf") == []
    assert len(viewer.layers) == 0
    assert len(shown) == 1 and "broken.nii.gz" in shown[0]


def test_real_hippocampus_scan(plugins, shared_data):
    from napari.components import ViewerModel

    path = shared_data / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    [layer] = ViewerModel().open(str(path), plugin="napari-kaf")
    volume = read_volume(path)
    assert layer.data.shape == volume.shape
    np.testing.assert_allclose(layer.scale, volume.spacing)
    np.testing.assert_allclose(layer.metadata["affine"], volume.affine)


def test_sample_data(plugins):
    from napari.components import ViewerModel

    image, labels = synthetic_sample()
    assert image[2] == "image" and labels[2] == "labels"
    assert image[0].shape == labels[0].shape and image[0].ndim == 3
    assert set(np.unique(labels[0])) == {0, 1, 2}
    assert labels[1]["visible"] is False

    viewer = ViewerModel()
    viewer.open_sample("napari-kaf", "synthetic")
    assert [layer.name for layer in viewer.layers] == ["Synthetic ring", "Synthetic ring reference labels"]
    np.testing.assert_allclose(viewer.layers[0].scale, (3.0, 1.0, 1.0))


def test_mni152_sample_is_a_real_mri(mni_sample):
    image, labels = mni_sample
    assert image[0].shape == labels[0].shape == (95, 117, 99)
    np.testing.assert_allclose(image[1]["scale"], (2.0, 2.0, 2.0))
    assert image[1]["metadata"]["affine"].shape == (4, 4)
    assert labels[1]["metadata"]["label_names"] == ["background", "grey matter", "white matter"]
    assert image[0].std() > 0 and (labels[0] == 1).sum() > 1000 and (labels[0] == 2).sum() > 1000


def test_layer_kwargs_from_volume():
    volume = Volume(_image(), OBLIQUE, source=Path("x.nii.gz"))
    kwargs = layer_kwargs(volume, "x")
    np.testing.assert_allclose(kwargs["scale"], volume.spacing)
    assert kwargs["metadata"]["source"] == "x.nii.gz"
