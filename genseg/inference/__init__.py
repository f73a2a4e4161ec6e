"""Using a trained segmenter: loading it (segmenter.py, onnx.py), predicting with test-time augmentation and
small-component removal (postprocess.py), and segmenting files on disk (files.py)."""
