"""Safety suite: crash recovery, many processes, hostile archives, full disk (issue 4)."""
