"""partita.testbed."""
