"""KAF Segment core: keypoint-augmented fusion UNet, few-slice fine-tuning, prediction, explanation.

This package never imports Qt, napari or Slicer: the GUIs are thin front-ends over it.
"""

__version__ = "0.1.0"
