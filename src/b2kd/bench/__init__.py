"""Bench grids: every cell a pipeline run (in one process or as Ray tasks), and their tables."""
