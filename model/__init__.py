"""The RefineFormer3D / SegFormer3D model family: spec, layers, inference rewrites, multiply-add counting,
SegFormer3D import."""
