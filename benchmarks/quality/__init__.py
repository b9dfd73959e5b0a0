"""The quality benchmark: does CPI-FT work, on a model and tasks anyone can rerun on a CPU."""
