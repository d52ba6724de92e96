"""napari plugin for KAF Segment (widgets arrive with the napari issue)."""
