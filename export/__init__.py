"""Cloud side of corrosion-edge: datasets, training, ONNX export, registry."""
