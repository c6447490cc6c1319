"""RubberBand operators."""
