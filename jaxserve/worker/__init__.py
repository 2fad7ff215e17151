"""The device side of a step: the model runner, the persistent batch, the packed step arrays, the
compiled step functions and the attention backend interface."""
