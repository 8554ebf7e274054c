"""Backbones: image -> embedding. Front door: `mrl.models.backbones.build_backbone`; the blog's CNN and the ResNets
live in backbones, any timm model and torchvision's pretrained ResNets in pretrained_backbones."""
