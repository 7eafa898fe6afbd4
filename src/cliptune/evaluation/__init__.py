"""The standard retrieval protocol: embedding a split once, R@K (CLIP_benchmark-exact), comparing
base, adapters and scales, and the report."""
