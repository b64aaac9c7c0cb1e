"""Data: sources (shapes, folder), the vocabulary layout and the grain pipeline."""
