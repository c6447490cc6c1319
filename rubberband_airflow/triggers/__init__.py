"""RubberBand triggers."""
