"""Task heads that sit on a backbone's features (classification now; dense heads by name later)."""

from .classification import LinearClassifier

__all__ = ["LinearClassifier"]
