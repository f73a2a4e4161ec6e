"""Jobs that chain the layers below and write folders of results: sampling to files, `genseg pipeline`'s output
folders, ONNX export, and the `genseg demo` stages; the CLI, the scripts and the server call these."""
