"""Data: raw change-detection layouts -> ArrayRecord shards -> the Grain training pipeline.

`layouts` (the raw folder layouts of the public datasets) and `reading` (decoding, band and size
checks) feed `convert` (shards + dataset_info.json; `python -m data_prep.convert` is its
command line), which finds split leaks with `leaks` (exact and perceptual hashes);
`fingerprint` identifies a converted dataset (model cards, `evaluate --verify`); `synthetic`
makes the demo scenes; `shards` makes sure the shards a config names exist and fit the model
before training; `records` is the record format both sides share;
`imagery` holds band / bit-depth rules and the ImageNet normalisation used everywhere;
`augment` and `input_pipeline` are the paired augmentations and the sharded, checkpointable
Grain iterators. What this layer may import: docs/architecture.md, "Import rules".
"""
