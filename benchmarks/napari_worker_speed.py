"""Is fine-tuning slower inside the napari plugin's worker thread than from the CLI? (micro-sam#740 found
compute in napari thread workers much slower than in the main thread.)

Both modes run the same job from scratch: prepare the image (normalisation, SIFT keypoints) and fine-tune
with the same settings and seed.

- direct: `kaf.jobs.events.drive` in the main thread, as `kaf finetune` does;
- worker: the plugin's own path: the KAF Segment widget's Fine-tune, i.e. the job in a napari
  `thread_worker` with the Qt event loop running and every progress event updating the widget and
  napari's progress bar. With `--viewer` the widget sits in a real napari Viewer showing the image
  (needs OpenGL: run under xvfb-run); without it, on a canvas-free ViewerModel (offscreen is fine).

The modes alternate (direct, worker, direct, worker, ...) so that a change in machine load hits both;
the ratio is the median worker time over the median direct time.

    QT_QPA_PLATFORM=offscreen python benchmarks/napari_worker_speed.py [--steps 30] [--rounds 3]
    xvfb-run -a python benchmarks/napari_worker_speed.py --viewer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch


def mni_volume(slices: int):
    """The MNI152 T1 (nilearn's wheel) cut to `slices` axial slices, with 2 slices annotated."""
    from kaf.data.annotation import sparse_annotation
    from kaf.data.sample_data import mni152_with_tissue_labels
    from kaf.data.volume_io import Volume

    volume, labels, _names = mni152_with_tissue_labels()
    first = (volume.shape[0] - slices) // 2
    crop = slice(first, first + slices)
    image = Volume(np.ascontiguousarray(volume.array[crop]), volume.affine)
    reference = np.ascontiguousarray(labels[crop])
    painted = [slices // 4, (3 * slices) // 4]
    sparse = np.zeros_like(reference)
    sparse[painted] = reference[painted]
    return image, sparse, sparse_annotation(sparse, 0)


def run_direct(image, annotation, settings) -> tuple[float, float]:
    from kaf.app.workflow import finetune_volume
    from kaf.jobs.events import drive

    start, cpu = time.perf_counter(), time.process_time()
    drive(finetune_volume(image, annotation, settings))
    return time.perf_counter() - start, time.process_time() - cpu


def run_worker(widget, settings) -> tuple[float, float]:
    from qtpy.QtCore import QEventLoop

    from napari_kaf._panel import select_data

    widget.steps_spin.setValue(settings.steps)
    widget.batch_spin.setValue(settings.batch_size)
    widget.crop_spin.setValue(settings.crop_size)
    widget.predict_after_check.setChecked(False)
    select_data(widget.device_combo, settings.device)
    widget.controller.model = None
    loop = QEventLoop()
    start, cpu = time.perf_counter(), time.process_time()
    if not widget.start_finetune():
        raise SystemExit(f"the widget refused to fine-tune: {widget.status_label.text()}")
    # After the widget's own handler, connected first: the job has ended when the controller is idle.
    widget.controller.busy_changed.connect(lambda busy: None if busy else loop.quit())
    loop.exec()  # the Qt event loop runs while the worker trains, as in napari
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    if widget.controller.model is None:
        raise SystemExit(f"fine-tuning in the widget failed: {widget.status_label.text()}")
    return seconds, cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads in both modes (0: torch's default). On a machine shared with other "
        "busy processes, OpenMP threads that outnumber the free cores slow the main thread by several times "
        "and make the comparison meaningless; 1 keeps it fair there.",
    )
    parser.add_argument("--viewer", action="store_true", help="a real napari Viewer (needs OpenGL/xvfb)")
    args = parser.parse_args()
    if not args.viewer and not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from qtpy.QtCore import QSettings, QThreadPool
    from qtpy.QtWidgets import QApplication

    from kaf.jobs.finetune import FinetuneSettings
    from napari_kaf._marshal import layer_kwargs
    from napari_kaf._widget import KafWidget

    app = QApplication.instance() or QApplication(sys.argv)  # noqa: F841 - Qt needs it alive
    if args.threads:
        torch.set_num_threads(args.threads)  # the widget hands this count to its worker threads
    # Keep the user's remembered plugin settings untouched.
    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, "/tmp/kaf-benchmark-settings")

    image, sparse, annotation = mni_volume(args.slices)
    settings = FinetuneSettings(
        steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, device=args.device, seed=0
    )
    if args.viewer:
        import napari

        viewer = napari.Viewer(show=True)
        mode = "napari Viewer (OpenGL canvas) + widget"
    else:
        from napari.components import ViewerModel

        viewer = ViewerModel()
        mode = "ViewerModel + widget"
    layer = viewer.add_image(image.array, **layer_kwargs(image, "MNI152 T1"))
    widget = KafWidget(viewer)
    if args.viewer:
        viewer.window.add_dock_widget(widget, name="KAF Segment")
    widget.image_combo.setCurrentText(layer.name)
    widget.new_annotation_layer()
    viewer.layers["kaf:annotation"].data[:] = sparse

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Qt platform "
        f"{QApplication.platformName()}, worker mode: {mode}"
    )
    print(
        f"job: prepare + fine-tune, {args.slices} MNI152 slices, steps {args.steps}, "
        f"batch {args.batch_size}, crop {args.crop_size}, device {args.device}, seed 0"
    )
    run_direct(image, annotation, FinetuneSettings(steps=2, batch_size=2, crop_size=32, device=args.device))
    direct, worker = [], []
    for round_index in range(args.rounds):
        direct.append(run_direct(image, annotation, settings))
        worker.append(run_worker(widget, settings))
        print(
            f"round {round_index + 1}: direct {direct[-1][0]:.2f} s wall / {direct[-1][1]:.2f} s CPU, "
            f"worker {worker[-1][0]:.2f} s wall / {worker[-1][1]:.2f} s CPU"
        )
    for index, what in ((0, "wall"), (1, "CPU")):
        median_direct = statistics.median(d[index] for d in direct)
        median_worker = statistics.median(w[index] for w in worker)
        ratio = median_worker / median_direct
        print(
            f"{what}: median direct {median_direct:.2f} s, median worker {median_worker:.2f} s, "
            f"worker / direct = {ratio:.3f} ({'within' if ratio <= 1.2 else 'OVER'} the 1.2 limit)"
        )
    QThreadPool.globalInstance().waitForDone()
    widget.close()
    if args.viewer:
        viewer.close()


if __name__ == "__main__":
    main()
