"""The paid pool: which images a distillation sends to the teacher, and the answers it pays for."""
