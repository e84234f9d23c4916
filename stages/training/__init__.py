"""Selective training: applying a selection to a model, packing a data drop, the DeepSpeed loop, the tensor audit."""
