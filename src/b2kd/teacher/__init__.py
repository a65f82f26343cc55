"""The cloud's side before any query: training the teacher (for the demo and the benches)."""
