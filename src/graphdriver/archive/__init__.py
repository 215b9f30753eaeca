"""The tar engine every driver shares: apply, export, changes, compression, whiteouts.

Nothing here knows which driver called it: drivers hand in directories (or directory file
descriptors) and streams, and get back results.
"""
