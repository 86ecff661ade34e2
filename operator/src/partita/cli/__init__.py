"""partita.cli."""
