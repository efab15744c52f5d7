"""Dock widgets: the only package that imports Qt, magicgui or napari's Qt parts."""
