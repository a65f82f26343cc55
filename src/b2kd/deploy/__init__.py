"""On the device: ONNX export and quantisation, prediction, adapting the student to a new task."""
