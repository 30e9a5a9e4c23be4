"""Inference: trained models applied to images and whole scenes, and exported for deployment.

`predictor` (`ChangeDetector`, loading any checkpoint: ours, a convert_torch dir, an upstream
.pth), `sliding_window` (the bounded-memory windowed engine with blending), `raster_io`
(GeoTIFF / plain-image pairs, grids, nodata, COG and PNG writing), `scene_outputs` (whole-scene
passes after the engine), `postprocess` and `vectors` (shape filtering, polygons as GeoJSON /
GPKG / FGB), `formats` (the one table of output formats by extension), `pipeline` (what
`python -m segchange_jax.infer` runs), `bundle` (the export folder every format writes),
`export` (StableHLO), `onnx_export` + `jaxpr_onnx` (ONNX; the converter is generic) and
`onnx_runtime` (running the ONNX file on scenes).
What this layer may import: docs/architecture.md, "Import rules".
"""
