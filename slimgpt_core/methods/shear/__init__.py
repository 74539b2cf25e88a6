"""Sheared-LLaMA (Xia et al., ICLR 2024): learned hard-concrete masks drive a model to a chosen shape, then the
model is cut to it. hard_concrete: the gate math; target: the shape; masks: the gates and the Lagrangian;
apply: gates on a model through hooks; cut: fold and slice; train: the driver."""
