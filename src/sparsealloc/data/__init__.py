"""Data sources: text corpora and zero-shot task data."""
