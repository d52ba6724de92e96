"""What every layer leans on: the error types, atomic file writes, host memory and compute devices."""
