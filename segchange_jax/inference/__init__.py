"""Inference: trained models applied to images and whole scenes, and exported for deployment.

`predictor` (`ChangeDetector`, loading any checkpoint: ours, a convert_torch dir, an upstream
.pth), `sliding_window` (the bounded-memory windowed engine with blending), `raster_io`
(GeoTIFF / plain-image pairs, grids, nodata, COG writing), `scene_outputs` (whole-scene passes
after the engine), `postprocess` and `vectors` (shape filtering, polygons as GeoJSON / GPKG /
FGB), `pipeline` (what `python -m segchange_jax.infer` runs), `export` (StableHLO bundle).
May import: base modules, models/, text/, data/ (imagery) and interop/ (checkpoints are
read through interop/checkpoints.py); never train/.
"""
