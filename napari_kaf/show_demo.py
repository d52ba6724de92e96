"""Open the demo's outputs in napari with the KAF dock widget: `python -m napari_kaf.show_demo DIR`.

`kaf demo` starts this in its own process when a display is available, so the core never imports a GUI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kaf.data.volume_io import read_labels, read_volume
from napari_kaf._marshal import layer_kwargs

LABEL_FILES = (("reference.nii.gz", "reference"), ("annotation.nii.gz", "kaf:annotation"))


def show(folder: Path) -> None:
    import napari

    image = read_volume(folder / "image.nii.gz")
    viewer = napari.Viewer(title="KAF Segment demo")
    viewer.add_image(image.array, **layer_kwargs(image, "image"))
    uncertainty = read_volume(folder / "uncertainty.nii.gz")
    viewer.add_image(
        uncertainty.array, **layer_kwargs(uncertainty, "kaf:uncertainty"), colormap="magma", visible=False
    )
    for file_name, name in (*LABEL_FILES, ("segmentation.nii.gz", "kaf:prediction")):
        labels = read_labels(folder / file_name, image)
        viewer.add_labels(labels, **layer_kwargs(image, name), visible=name != "reference")
    viewer.window.add_plugin_dock_widget("napari-kaf")
    viewer.dims.set_current_step(0, int(viewer.layers["kaf:annotation"].data.any((1, 2)).argmax()))
    napari.run()


if __name__ == "__main__":
    show(Path(sys.argv[1] if len(sys.argv) > 1 else "kaf-demo-output"))
