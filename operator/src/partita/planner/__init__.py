"""partita.planner."""
