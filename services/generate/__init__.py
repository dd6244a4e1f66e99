"""Text generation: the standalone server, the reference/compare CLIs and the served runtime."""
