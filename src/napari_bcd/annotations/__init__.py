"""Annotations in and out: QuPath GeoJSON, Aperio ImageScope XML, ASAP XML, napari Shapes."""

from .geojson import to_feature_collection, write_geojson
from .model import Annotation, ReadReport
from .read import AnnotationList, read_annotations

__all__ = ["Annotation", "AnnotationList", "ReadReport", "read_annotations", "to_feature_collection", "write_geojson"]
