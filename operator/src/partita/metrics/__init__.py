"""partita.metrics."""
