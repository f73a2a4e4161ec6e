"""Jobs that chain the layers below and write folders of results: sampling to files, `genseg pipeline`'s output
folders, ONNX export, and the `genseg demo` stages; the CLI and the scripts call these."""
