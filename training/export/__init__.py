"""Export: a training run as a bundle (docs/bundle-format.md): the writer, ONNX graphs, FAISS index, ridge map."""
