"""partita.kube."""
