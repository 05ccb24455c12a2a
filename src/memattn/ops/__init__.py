"""One module per technique; ``dispatch.attention`` is the public entry point."""
