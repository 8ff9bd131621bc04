"""Experiments: datasets, models, runs, the `natgrad` CLI (needs the `experiments` extra)."""
