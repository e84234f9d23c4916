"""The promotion gate of a model line: the rules a trained model must pass (gate) and their check on an evaluation."""
