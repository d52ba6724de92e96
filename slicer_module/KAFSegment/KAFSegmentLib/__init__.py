"""Helpers of the KAF Segment module. `signal`, `progress`, `process`, `command`, `volumes` and
`install` import neither slicer nor qt at module level; `mrml` and `logic` need the MRML classes of
Slicer or of the `slicer-core` wheel."""
