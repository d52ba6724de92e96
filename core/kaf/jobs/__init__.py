"""Long-running jobs (fine-tune, predict, explain) as generators of progress events."""
