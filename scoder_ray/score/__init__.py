"""Multi-aspect scoring (an LLM judge with structured outputs), execution checks, learned weights, selection."""
