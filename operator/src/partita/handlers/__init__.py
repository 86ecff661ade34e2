"""partita.handlers."""
