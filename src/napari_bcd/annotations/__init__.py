"""Annotations in and out: QuPath GeoJSON, Aperio ImageScope XML, ASAP XML, napari Shapes."""

from .geojson import to_feature_collection, write_geojson
from .model import Annotation, ReadReport

__all__ = ["Annotation", "ReadReport", "to_feature_collection", "write_geojson"]
