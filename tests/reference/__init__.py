"""Pure-Python references of the compiled drafting core: the specification its parity tests compare against."""
