"""Datasets as splits. Front door: `mrl.data.sources.load_splits(name, path, ...)` -> Splits; the presets
(presets.PRESETS), the split record config.json keeps (splits), ImageNet's sources (imagenet), webdataset shards
(shards) and ImageNet prepared as shards once (prepare_imagenet, `python -m mrl.data.prepare_imagenet`)."""
