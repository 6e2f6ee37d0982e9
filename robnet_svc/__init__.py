"""robnet-svc: certifiably robust fine-tuning of ONNX image classifiers against bias fields."""

__version__ = "0.1.0"
