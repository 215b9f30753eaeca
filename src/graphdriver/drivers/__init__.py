"""Storage drivers: each module defines one ``LayerStore`` subclass and exports it as ``DRIVER``."""
