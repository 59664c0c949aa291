"""phi3-operator data plane: MLflow pyfunc wrappers and the MLServer runtime."""
