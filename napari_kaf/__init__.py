"""napari plugin for KAF Segment (npe2 manifest: napari.yaml).

- `_io`: reader and writers for NIfTI and NRRD (spacing as the layer scale, affine in metadata);
- `_sample_data`: the MNI152 T1 with tissue labels (nilearn's wheel) and a small generated volume;
- `_widget`: the KAF Segment dock widget, wiring the panel (`_panel`, its controls), the session
  controller (`_controller`: model, prepared image, explanation, jobs; no Qt widgets) and the viewer;
- `_layers`: the layers it draws (prediction, uncertainty, keypoints, attention); `_inspect`: the
  Inspect section; `_annotation`: the annotation layer; `_shortcuts`: the keyboard shortcuts;
- `_jobs`, `_runner`: what the jobs run (the core's steps chained; no Qt) and where (a napari worker);
- `_marshal`, `_slices`, `_suggest`, `_checkpoints`, `_settings`: layers <-> arrays, the slice in view,
  next-slice choice, the checkpoint menu and the remembered settings.
"""
