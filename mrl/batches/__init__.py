"""From a split's undecoded images to training and evaluation batches: decoding (decode, reduced_decode, device_decode), the
transforms and collating (transforms, ssl_augment), and the loaders the training loop draws epochs from (loaders:
the DataLoader's workers; device_data: decoded once and kept on the accelerator; streams: webdataset shards)."""
