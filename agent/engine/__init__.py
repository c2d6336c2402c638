"""The pixel engine: verified ONNX models compiled into exact colour tables."""
