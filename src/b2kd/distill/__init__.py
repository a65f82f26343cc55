"""Step two: train the student on the paid pool (the run, its loss terms, and one file per method)."""
