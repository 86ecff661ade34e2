"""partita.api."""
