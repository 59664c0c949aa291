"""phi3-operator control plane: reconciles Phi3Model resources into Deployments and Services."""
