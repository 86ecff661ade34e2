"""The one module that imports onnxruntime (see STYLE.md and the import-linter contracts)."""
