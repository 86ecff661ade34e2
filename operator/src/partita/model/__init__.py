"""Model analysis: load, profile, cut, slice and shard ONNX graphs with the onnx package.

Model files are read and rewritten here; onnxruntime runs them only through
`partita.runtime`, where analysis needs a real run: shapes symbolic inference cannot resolve,
verification of cuts and shards, and the measured accuracy of compressed stages.
"""
