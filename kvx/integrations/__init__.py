"""Integrations with model runtimes; each lives in its own module with its own extra."""
