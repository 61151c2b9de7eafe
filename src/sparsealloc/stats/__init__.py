"""Statistics of a model's weights that allocators read (spectra)."""
