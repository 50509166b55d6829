"""The RefineFormer3D / SegFormer3D model family: spec, layers, multiply-add counting, SegFormer3D import."""
