"""What a person reads: the terminal summary, pictures, model-card section and plan files.

Reads plans; computes nothing the analysis did not.
"""
