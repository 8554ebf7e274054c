"""--reduced_decode: a JPEG decoded only at the scale its crop needs.

A 160 px RandomResizedCrop of a 1,280 px photo keeps one decoded pixel in dozens. libjpeg decodes at 1/2, 1/4 or 1/8
of the size for less (a scaled inverse DCT: PIL's `draft`; TorchCodec has no such option), so here the crop box is
drawn from the header's size first, with the very random numbers of the full path, and the image is decoded at the
largest of those scales that still gives the box at least the output resolution, then resized there: PIL's resize
of the box in the reduced image's coordinates (fractional: the same source region as the full path, to the pixel),
with the step's interpolation; the later steps (flip, ToTensor, Normalize) are torchvision's v2 twins on the uint8
tensor (mrl.batches.decode.tensor_twin). Evaluation's Resize -> CenterCrop likewise: a shorter side at least twice the
resize target decodes at 1/2, and so on.

Where the full scale is needed (the box is smaller than twice the output), and for what is not a plain JPEG (CMYK,
PNG, EXIF-rotated, truncated: mrl.batches.decode.is_plain_jpeg), the random numbers are rewound and the image takes
the --decoder path as without the flag: the same pixels. For the others, the same crops from the same seeds, whose
pixels come from libjpeg's scaled IDCT instead of the resize's averaging: tests/test_reduced_decode.py and
benchmarks/bench_imagenet_loader.py measure them against a full decode with the same crop.

What it saves is the IDCT, upsampling and colour conversion of the pixels the crop drops; libjpeg still entropy-decodes
every coefficient of the file. So the gain grows with the image: large for photos of 1,000 px and more, little for
those already at ImageNet's typical 500x375 (and for prepared shards, mrl.data.prepare_imagenet, whose longer side is
at most 500 px) -- benchmarks/README.md has the numbers.
"""

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as F2

from mrl.batches.decode import is_plain_jpeg, open_header, tensor_twin

SCALES = (8, 4, 2)  # libjpeg's reduced scales, 1/8 first: the cheapest that still suffices


def reduced_transform(transform):
    """ReducedDecode for build_transform's T.Compose, or None when its first steps are not a RandomResizedCrop or a
    Resize (optionally followed by a CenterCrop), or a later step has no tensor twin (the SSL recipe's colour
    jitter)."""
    steps = list(getattr(transform, "transforms", []))
    if not steps or not any(isinstance(step, T.ToTensor) for step in steps):
        return None
    if type(steps[0]) is T.RandomResizedCrop:
        geometry, rest = steps[:1], steps[1:]
    elif type(steps[0]) is T.Resize and steps[0].max_size is None:
        geometry = steps[:2] if len(steps) > 1 and type(steps[1]) is T.CenterCrop else steps[:1]
        rest = steps[len(geometry):]
    else:
        return None
    twins = [tensor_twin(step) for step in rest]
    return None if any(twin is None for twin in twins) else ReducedDecode(geometry, T2.Compose(twins))


class ReducedDecode:
    """(a parsed header, its encoded bytes) -> the transformed tensor, decoded at a reduced scale; None where that
    does not apply (see the module docstring), with the random numbers left as they were found."""

    def __init__(self, geometry, rest):
        self.geometry, self.rest = geometry, rest
        self.resample = F.pil_modes_mapping[geometry[0].interpolation]

    def __call__(self, image, data):
        """`image`: open_header(data), left undecoded (the full path may decode it next)."""
        if not is_plain_jpeg(image, data):
            return None
        width, height = image.size
        first = self.geometry[0]
        if type(first) is T.RandomResizedCrop:
            out_height, out_width = first.size
            if min(width / out_width, height / out_height) < SCALES[-1]:  # no box can be reduced: draw nothing
                return None
            state = torch.random.get_rng_state()
            # the full path's draws, from the header's size
            top, left, box_height, box_width = first.get_params(image, first.scale, first.ratio)
            box = (left, top, left + box_width, top + box_height)
        else:  # the whole image, to the size the full path resizes it to
            state = None
            box, (out_height, out_width) = (0, 0, width, height), resized_size(first.size, height, width)
        scale = reduction((box[2] - box[0]) / out_width, (box[3] - box[1]) / out_height)
        try:
            if scale == 1:
                raise ValueError("the full scale is needed")
            reduced = open_header(data)  # a copy of its own: `image` stays as it was for the full path
            if reduced.draft("RGB", (width // scale, height // scale)) is None \
                    or reduced.size != (-(-width // scale), -(-height // scale)):
                raise ValueError("no reduced scale")
            reduced = reduced if reduced.mode == "RGB" else reduced.convert("RGB")
            # libjpeg's pixel i at scale 1/s covers source pixels [i*s, (i+1)*s): the box in its coordinates
            reduced = reduced.resize((out_width, out_height), self.resample, box=tuple(c / scale for c in box))
        except Exception:  # not reduced, or not decodable: the full path decides, with the same random numbers
            if state is not None:
                torch.random.set_rng_state(state)
            return None
        pixels = F2.pil_to_tensor(reduced)
        if len(self.geometry) > 1:  # evaluation's centre crop
            pixels = F2.center_crop(pixels, list(self.geometry[1].size))
        return self.rest(pixels)


def reduction(*ratios):
    """The largest of libjpeg's scales s with every ratio (source px per output px) at least s; 1 when none."""
    return next((s for s in SCALES if min(ratios) >= s), 1)


def resized_size(size, height, width):
    """(height, width) that T.Resize(size) gives an image of height x width: `size` itself for a pair, else the
    shorter side to `size` and the longer in proportion, rounded down (torchvision's rule)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return tuple(size)
    short = size[0] if isinstance(size, (list, tuple)) else size
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)
