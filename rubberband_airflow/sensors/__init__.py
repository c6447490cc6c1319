"""RubberBand sensors."""
