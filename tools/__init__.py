"""Developer tools that check the package without being part of it (not installed with it)."""
