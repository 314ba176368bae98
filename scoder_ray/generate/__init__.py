"""Writing (problem, solution) pairs: vLLM engines, multi-checkpoint sampling, the teacher client."""
