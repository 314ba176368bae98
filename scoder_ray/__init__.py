"""scoder-ray: iterative self-distillation of code-instruction data synthesizers on Ray (SCoder)."""
__version__ = "0.1.0"
