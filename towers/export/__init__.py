"""Export a trained model to a bundle: FAISS item index, ONNX towers, encoders, manifest."""
