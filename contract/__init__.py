"""The export -> runtime contract: the artifacts manifest (contract.manifest) and the TensorRT
version/GPU rules (contract.tensorrt). Below both export/ and runtime/; imports only graphs/."""
