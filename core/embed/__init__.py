"""Embeddings: backbones (`backbones` registry; `resnet` trained here, `timm_models` pretrained),
resumable per-image embedding in the store (`embeddings`), the 2-D map and neighbours (`projection`)."""
