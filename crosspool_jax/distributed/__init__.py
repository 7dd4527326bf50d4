"""Multi-process CrossPool on JAX's distributed runtime: a process's place in the run and its
device groups (`runtime`), moving hidden states between processes (`transfer`), starting local
runs (`launch`). WORKSPACE.md, "Multi-process"."""
