"""napari plugin for KAF Segment (npe2 manifest: napari.yaml).

- `_io`: reader and writers for NIfTI and NRRD (spacing as the layer scale, affine in metadata);
- `_sample_data`: the MNI152 T1 with tissue labels (nilearn's wheel) and a small generated volume;
- `_widget`: the KAF Segment dock widget (annotate, fine-tune, predict, next slice, inspect, save);
- `_jobs`: what its worker threads run (the core's steps chained; no Qt);
- `_marshal`, `_suggest`, `_checkpoints`, `_settings`: layers <-> arrays, next-slice choice, the
  checkpoint menu and the remembered settings.
"""
