"""Reading slides and images."""

from .open import open_slide
from .slide import Slide

__all__ = ["Slide", "open_slide"]
