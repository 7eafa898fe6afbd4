"""Shipping a fine-tuned model: merged and ONNX export, embedders (torch or onnxruntime) and the
FAISS search index."""
