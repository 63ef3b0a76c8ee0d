"""Inference: how a trained model's features are computed, below both ``engine`` and ``deploy``.

``backend`` (the PyTorch path with its precision, the exported backends and how ``auto``
settles between them), one module per exported backend (``onnxruntime_backend``),
``extract`` (features of a list of images) and ``export`` (ONNX export with its check).
"""
