"""Reading slides and images."""

from .slide import Slide, open_slide

__all__ = ["Slide", "open_slide"]
