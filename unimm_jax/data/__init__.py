"""Data: sources (shapes, folder), tokenizers, the vocabulary layout and the grain pipeline."""
