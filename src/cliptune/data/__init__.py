"""Image-caption data: annotation readers, safe image decoding and the model's exact preprocessing,
the image cache, training batches, WebDataset shards and generated scenes. Knows nothing of models."""
