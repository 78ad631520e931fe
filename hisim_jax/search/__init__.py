"""SLO-constrained configuration search (its own issue)."""
