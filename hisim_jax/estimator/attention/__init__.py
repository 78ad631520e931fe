"""Attention kernels, one file per backend: its launch grid, tiles and split heuristic."""
