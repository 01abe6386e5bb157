"""The Ray label dump to a Zarr store, its verification, LV-ViT interop and pictures."""
