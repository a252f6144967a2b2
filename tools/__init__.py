"""Repository tools that run before the virtual environment exists (standard library only)."""
