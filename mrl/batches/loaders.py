"""The training loaders, behind the one interface the training loop calls (EpochLoader): `len(loader)` batches per
epoch, the same on every process, and `loader.batches(epoch, start)` -- this process's batches of `epoch` from batch
`start` on (a mid-epoch resume continues with the very batches the interrupted run would have taken).

Three loaders implement it:
  WorkerLoader   a prepared DataLoader whose workers decode and augment (the default)
  DeviceLoader   the split decoded once and kept on the accelerator (--data_on_device; mrl.batches.device_data)
  StreamLoader   webdataset shards, split over processes and workers (mrl.batches.streams)
"""


class EpochLoader:
    """What the training loop draws an epoch from (see the module docstring)."""

    def __len__(self):
        raise NotImplementedError

    def batches(self, epoch, start=0):
        raise NotImplementedError


class WorkerLoader(EpochLoader):
    """A DataLoader prepared by Accelerate, and the training transform its workers apply.

    The shuffle order and every sample's augmentation are functions of (seed, epoch), so skipping the batches
    already consumed (for that epoch only) replays the uninterrupted run exactly.
    """

    def __init__(self, accelerator, loader, transform):
        self.accelerator, self.loader, self.transform = accelerator, loader, transform

    def __len__(self):
        return len(self.loader)

    def batches(self, epoch, start=0):
        self.transform.epoch = epoch  # read by the DataLoader workers when they start, i.e. at iter(batches)
        self.loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, start) if start else self.loader


def epoch_loader(accelerator, loader, transform=None):
    """A training loader as an EpochLoader: a prepared DataLoader gets its WorkerLoader (its workers read the epoch
    from `transform`); a DeviceLoader or StreamLoader is one already."""
    return loader if isinstance(loader, EpochLoader) else WorkerLoader(accelerator, loader, transform)
